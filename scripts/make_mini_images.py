"""Writes jaxtune/assets/mini_vqa.jsonl and jaxtune/assets/mini_images/: the image half of the
embedded default recipe (configs/sft_mini.py).

Small Pillow-drawn pictures (one or two coloured shapes on a plain background) in XTuner's
multimodal JSONL format: an `image_url` part with `image_wh` and a text part starting with
`<IMG_CONTEXT>`. Three aspect ratios, so the tiling gives 1 tile (square) and 2 tiles + a
thumbnail (2:1 and 1:2). Answers follow from the picture, so the loss can fall. Deterministic:
`python scripts/make_mini_images.py` rewrites the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((96, 96), (96, 96), (192, 96), (96, 192))   # square twice as often


def draw(canvas: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int],
         colour: tuple[int, int, int]) -> None:
  x0, y0, x1, y1 = box
  if shape == "circle":
    canvas.ellipse(box, fill=colour)
  elif shape == "square":
    canvas.rectangle(box, fill=colour)
  else:
    canvas.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def make_sample(i: int, rng: random.Random, image_dir: str) -> dict:
  width, height = rng.choice(SIZES)
  background = tuple(rng.randint(225, 255) for _ in range(3))
  image = Image.new("RGB", (width, height), background)
  canvas = ImageDraw.Draw(image)
  colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
  if width == height:
    margin = rng.randint(8, 20)
    draw(canvas, shape, (margin, margin, width - margin, height - margin), COLOURS[colour])
    question, answer = rng.choice([
        ("What colour is the shape?", f"The shape is {colour}."),
        ("What shape is in the picture?", f"It is a {colour} {shape}."),
    ])
  else:
    # Two halves: the shape sits in one of them; the question asks where.
    first = rng.random() < 0.5
    half = (0, 0, width // 2, height) if width > height else (0, 0, width, height // 2)
    if not first:
      half = ((width // 2, 0, width, height) if width > height else (0, height // 2, width, height))
    x0, y0, x1, y1 = half
    side = min(x1 - x0, y1 - y0) - 16
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    draw(canvas, shape, (cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2),
         COLOURS[colour])
    where = ("left" if first else "right") if width > height else ("top" if first else "bottom")
    question, answer = (f"Where is the {shape}?", f"The {colour} {shape} is on the {where}.")
  name = f"{i:03d}.png"
  image.save(os.path.join(image_dir, name), optimize=True)
  content = [{"type": "image_url", "image_url": {"url": f"mini_images/{name}",
                                                  "image_wh": [width, height]}},
             {"type": "text", "text": f"<IMG_CONTEXT>\n{question}"}]
  return {"id": i, "messages": [{"role": "user", "content": content},
                                {"role": "assistant", "content": answer}]}


def main() -> None:
  here = os.path.dirname(os.path.abspath(__file__))
  assets = os.path.join(here, "..", "jaxtune", "assets")
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default=os.path.join(assets, "mini_vqa.jsonl"))
  parser.add_argument("--n", type=int, default=48)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  image_dir = os.path.join(os.path.dirname(args.out), "mini_images")
  os.makedirs(image_dir, exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    for i in range(args.n):
      f.write(json.dumps(make_sample(i, rng, image_dir), ensure_ascii=False) + "\n")
  total = sum(os.path.getsize(os.path.join(image_dir, n)) for n in os.listdir(image_dir))
  print(f"wrote {args.n} samples to {os.path.normpath(args.out)} and their images "
        f"({total / 1024:.0f} KB) to {os.path.normpath(image_dir)}")


if __name__ == "__main__":
  main()
