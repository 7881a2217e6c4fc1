"""Think text and answer: BAGEL writes ``<think>plan</think>answer`` when asked to think first.
:func:`split_think` splits a whole text, :class:`ThinkStream` the same text as it streams. Every
front end that shows the two apart (the server, the UI, batch manifests) uses this module.
"""

from __future__ import annotations


def split_think(text: str | None) -> tuple[str | None, str]:
    """``<think>plan</think>answer`` -> (plan, answer). A think block cut short gives (plan, "")."""
    if text is None:
        return None, ""
    if "</think>" in text:
        head, tail = text.split("</think>", 1)
        head = head.strip()
        if head.startswith("<think>"):
            head = head[len("<think>"):]
        return head.strip(), tail.strip()
    stripped = text.lstrip()
    if stripped.startswith("<think>"):
        return stripped[len("<think>"):].strip(), ""
    return None, text


class ThinkStream:
    """Splits streamed text into think text and answer as it arrives, the way :func:`split_think` splits the
    whole: ``feed(delta)`` and ``finish()`` return ``[(kind, text), ...]`` with kind ``"reasoning"`` or
    ``"content"``; the pieces of each kind add up to what ``split_think`` gives for the whole text. A tag cut
    between two deltas, and whitespace that may turn out to be trailing, wait for the next delta."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, think: bool):
        self.think = think
        self.text = ""
        self.sent = {"reasoning": "", "content": ""}

    def _parts(self, final: bool) -> dict[str, str]:
        text = self.text
        if not self.think:
            return {"reasoning": "", "content": text}
        if not final:  # hold back a partial tag at the end
            for tag in (self.CLOSE, self.OPEN):
                cut = next((k for k in range(len(tag) - 1, 0, -1) if text.endswith(tag[:k])), 0)
                if cut:
                    text = text[:-cut]
                    break
        if self.CLOSE in text:
            head, tail = text.split(self.CLOSE, 1)
        elif text.lstrip().startswith(self.OPEN):
            head, tail = text, ""
        elif final:  # no think block after all: the whole text is the answer, as written
            return {"reasoning": "", "content": text}
        else:  # it may still turn out to be think text: wait
            return {"reasoning": "", "content": ""}
        head = head.strip()
        if head.startswith(self.OPEN):
            head = head[len(self.OPEN):]
        # strip() on a part still being written holds back whitespace that may turn out to be trailing
        return {"reasoning": head.strip(), "content": tail.strip()}

    def _emit(self, final: bool) -> list[tuple[str, str]]:
        out = []
        for kind, text in self._parts(final).items():
            if text.startswith(self.sent[kind]) and len(text) > len(self.sent[kind]):
                out.append((kind, text[len(self.sent[kind]):]))
                self.sent[kind] = text
        return out

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self.text += delta
        return self._emit(final=False)

    def finish(self) -> list[tuple[str, str]]:
        return self._emit(final=True)


def simple_think(text: str) -> str:
    """WISE's "simple think" (``gen_images_mp_wise.py``, ``simple_think=True``): only what follows ``</think>``
    conditions the picture, stripped, when there is something there; else the whole text. (The official code
    indexes the second part and so fails on a text without ``</think>``; here that text is kept whole.)"""
    parts = text.split("</think>")
    return parts[1].strip() if len(parts) > 1 and parts[1] != "" else text
