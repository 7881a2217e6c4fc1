"""Understanding benchmarks through lmms-eval (issue 17, point 4): its ``openai_compatible`` model type sends each
question as one user message, the text first and then every picture as a base64 PNG data URL, temperature 0,
``max_tokens``, many requests at once through ``AsyncOpenAI`` (its ``batch_size``, 64 by default), and counts a
failed request as an empty answer. This plays that client against a real ``bagel serve`` over loopback (the demo
model, so the answers mean something) and checks that every answer is the one the engine gives in-process
(pictures before the question, greedy), and that a queue sized for the batch refuses nothing."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
import torch

import bagel_engine
from bagel_engine.shapes import world
from test_serve_support import ServerProcess

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
openai = pytest.importorskip("openai", reason="the official openai client (dev extra)")

SCENES = [[world.Obj("red", "circle", 32, 32, 8)], [world.Obj("blue", "square", 12, 32, 8)],
          [world.Obj("yellow", "triangle", 32, 12, 9)], [world.Obj("green", "circle", 52, 32, 7)]]
QUESTIONS = ["What color is the circle?", "What shape is the blue object?", "What color is the triangle?",
             "Where is the green circle?"]
BATCH = 8  # lmms-eval's batch_size model argument: requests in flight at once


def _b64_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _payload(question: str, picture) -> dict:
    """What lmms_eval/models/simple/openai_compatible.py builds for one document."""
    return {"model": "bagel-shapes", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_b64_png(picture)}"}}]}]}


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--model", "bagel-shapes", "--no-ui", "--queue-size", str(BATCH), "--log-level", "warning",
                        env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
    yield srv
    srv.stop()


def test_lmms_eval_openai_compatible_requests_get_the_engine_s_answers(server):
    pictures = [world.draw(scene) for scene in SCENES]
    jobs = [(QUESTIONS[i % 4], pictures[i % 4]) for i in range(BATCH)]
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def ask_all():
        return await asyncio.gather(*(client.chat.completions.create(**_payload(q, p)) for q, p in jobs))

    responses = asyncio.run(ask_all())
    answers = [r.choices[0].message.content for r in responses]
    pipe = bagel_engine.load("bagel-shapes", device="cpu")
    expected = [pipe.understand(p, q, max_new_tokens=16).text for q, p in jobs]
    assert answers == expected
    assert all(a.strip() for a in answers)  # no request was refused (lmms-eval would score "" as wrong)
