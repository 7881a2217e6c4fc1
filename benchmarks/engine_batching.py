"""The engine alone, no server: 8 requests stepped together (one ``Engine.run``) against the same 8 one after
another, for images of two sizes and for answers of 64 tokens. Prints the wall times and their ratio.

    python benchmarks/engine_batching.py tests/data/tiny-v1/model
    python benchmarks/engine_batching.py benchmarks/configs/mid --random-weights
"""

from __future__ import annotations

import argparse
import time

import bagel_engine
from bagel_engine.params import ImageParams, TextParams
from bagel_engine.runtime.engine import Request


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--timesteps", type=int, default=25)
    ap.add_argument("--tokens", type=int, default=65)
    args = ap.parse_args()
    pipe = bagel_engine.load(args.model, device="cpu", random_weights=args.random_weights)

    def images(k):
        return [Request([f"a picture {i}"], image=ImageParams(num_timesteps=args.timesteps),
                        image_shape=((64, 64) if i % 2 else (32, 64)), seed=i) for i in range(k)]

    def answers(k):
        return [Request([f"tell me about {i}"], understanding_output=True, text=TextParams(args.tokens)) for i in range(k)]

    for name, make in (("images", images), ("answers", answers)):
        pipe.engine.run(make(2))  # warm-up
        t0 = time.perf_counter()
        for r in make(args.count):
            pipe.engine.run([r])
        alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe.engine.run(make(args.count))
        together = time.perf_counter() - t0
        print(f"{name:8s} {args.count} one after another {alone:7.3f} s   together {together:7.3f} s   "
              f"ratio {together / alone:.2f}")


if __name__ == "__main__":
    main()
