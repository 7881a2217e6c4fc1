"""Draws docs/images/bagel-shapes.png, the README's picture: prompts and edits by the shipped demo model.

    python docs/images/make_bagel_shapes_grid.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

import bagel_engine

PROMPTS = ["a red circle on the left", "three blue squares", "a yellow triangle above a green square",
           "a blue circle and a red square"]
EDITS = [("make the circle blue", 0), ("move the red circle to the right", 0)]
SCALE, SEED = 3, 3


def wrap(text: str, width: int = 30) -> list[str]:
    lines = [""]
    for word in text.split():
        if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}".strip()
    return lines


def main() -> None:
    pipe = bagel_engine.load("bagel-shapes", device="cpu")
    pictures = [(p, pipe.generate(p, seed=SEED).image) for p in PROMPTS]
    for instruction, k in EDITS:
        pictures.append((f"edit: {instruction}", pipe.edit([pictures[k][1]], instruction, seed=SEED).image))
    side = 64 * SCALE
    sheet = Image.new("RGB", (side * len(pictures), side + 34), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (text, image) in enumerate(pictures):
        sheet.paste(image.resize((side, side), Image.NEAREST), (i * side, 0))
        for j, line in enumerate(wrap(text)[:2]):
            draw.text((i * side + 4, side + 3 + 14 * j), line, fill=(60, 60, 60))
        draw.rectangle([i * side, 0, (i + 1) * side - 1, side - 1], outline=(200, 200, 200))
    out = Path(__file__).with_name("bagel-shapes.png")
    sheet.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
