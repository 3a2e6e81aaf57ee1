"""Writes jaxtune/assets/mini_sft.jsonl: the demo chats of the embedded default recipe.

Short, templated English chats (arithmetic, capitals, opposites, counting, sequences, letter
tasks) whose answers follow from the question, so a tiny model's loss falls within a few dozen
steps on the CPU. Deterministic: `python scripts/make_mini_data.py` rewrites the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import random

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "Canada": "Ottawa", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens",
    "Portugal": "Lisbon", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin",
    "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok", "Sweden": "Stockholm",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night",
    "open": "closed", "light": "dark", "happy": "sad", "early": "late", "old": "new",
    "full": "empty", "left": "right", "hard": "soft", "wet": "dry", "high": "low",
}
WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "star", "moon", "bird", "rain",
         "lamp", "milk", "ship", "road", "leaf", "frog", "cake", "rock", "wind", "snow"]
SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "You are a precise tutor."]


def arithmetic(rng: random.Random) -> tuple[str, str]:
  a, b = rng.randint(1, 20), rng.randint(1, 20)
  if rng.random() < 0.5:
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
  a, b = max(a, b), min(a, b)
  return f"What is {a} - {b}?", f"{a} - {b} = {a - b}."


def capital(rng: random.Random) -> tuple[str, str]:
  country = rng.choice(sorted(CAPITALS))
  return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def opposite(rng: random.Random) -> tuple[str, str]:
  word = rng.choice(sorted(OPPOSITES))
  return f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}."


def counting(rng: random.Random) -> tuple[str, str]:
  start = rng.randint(1, 15)
  end = start + rng.randint(3, 6)
  return f"Count from {start} to {end}.", ", ".join(str(i) for i in range(start, end + 1)) + "."


def sequence(rng: random.Random) -> tuple[str, str]:
  start, step = rng.randint(1, 10), rng.randint(2, 5)
  seq = [start + step * i for i in range(7)]
  shown = ", ".join(map(str, seq[:4]))
  return f"Continue the sequence: {shown}", ", ".join(map(str, seq[4:])) + "."


def letters(rng: random.Random) -> tuple[str, str]:
  word = rng.choice(WORDS)
  kind = rng.randrange(3)
  if kind == 0:
    return f"Spell the word {word}.", "-".join(word.upper()) + "."
  if kind == 1:
    return f"Write {word} in capital letters.", word.upper() + "."
  return f"What is the first letter of {word}?", f"The first letter of {word} is {word[0]}."


TASKS = [arithmetic, capital, opposite, counting, sequence, letters]


def make_chat(rng: random.Random) -> dict:
  messages = []
  if rng.random() < 0.3:
    messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
  for _ in range(rng.choice([1, 1, 1, 2, 3])):
    question, answer = rng.choice(TASKS)(rng)
    messages += [{"role": "user", "content": question},
                 {"role": "assistant", "content": answer}]
  return {"messages": messages}


def main() -> None:
  here = os.path.dirname(os.path.abspath(__file__))
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default=os.path.join(here, "..", "jaxtune", "assets",
                                                    "mini_sft.jsonl"))
  parser.add_argument("--n", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    for i in range(args.n):
      f.write(json.dumps({"id": i, **make_chat(rng)}, ensure_ascii=False) + "\n")
  print(f"wrote {args.n} chats to {os.path.normpath(args.out)} "
        f"({os.path.getsize(args.out) / 1024:.0f} KB)")


if __name__ == "__main__":
  main()
