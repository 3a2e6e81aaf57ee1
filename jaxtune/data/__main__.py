"""Inspect a recipe's data without touching an accelerator.

  python -m jaxtune.data --config=configs/<recipe>.py [--config.data.x=...] \\
      [--devices=N] [--show_row=0] [--epoch=0] [--json]

Prints per-dataset sample and token counts after sample_ratio, truncated / dropped / bad
counts, the pack count and efficiency and the optimizer steps per epoch, and for data with
images the image samples, tiles and how the tile bound (data.max_tiles_per_pack) packed them;
`--show_row=K` renders packed row K of the epoch's first batches back to text with the loss
mask shown: text between ⟦ and ⟧ is predicted (carries loss), ┃ separates packed samples, a
run of image tokens is shown as <IMG_CONTEXT>×N with the row's tiles listed. With Intern-S1's
scientific tokenizer, text read by its SMILES / IUPAC / FASTA model is shown as ⟪SMILES: ...⟫
after a tag, ⟪SMILES auto: ...⟫ where it was auto-detected.

The data is built as the trainer builds it (jaxtune.train.build, role 'train'), so row K is
the row that trains; the order depends on the data-parallel size (length grouping balances
each micro-batch over the ranks), which follows from the mesh on `--devices` devices.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # never claim an accelerator from here

from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from jaxtune.data.templates import IMG_CONTEXT  # pylint: disable=wrong-import-position

_DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "recipes",
                               "sft_mini.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_RECIPE,
                                          "Recipe file defining get_config(arg=None).")
_ROW = flags.DEFINE_integer("show_row", None, "Render this packed row of the epoch (0-based, "
                            "in training order) with its loss mask.")
_DEVICES = flags.DEFINE_integer("devices", None, "Devices the run trains on (default: the "
                                "product of the recipe's mesh axes, a -1 axis counted as 1).",
                                lower_bound=1)
_EPOCH = flags.DEFINE_integer("epoch", 0, "Epoch whose order --show_row follows.")
_JSON = flags.DEFINE_bool("json", False, "Print the statistics as JSON.")


def _squeeze_images(text: str) -> str:
  """A run of <IMG_CONTEXT> tokens as one <IMG_CONTEXT>×N."""
  return re.sub(f"(?:{re.escape(IMG_CONTEXT)}){{2,}}",
                lambda m: f"{IMG_CONTEXT}×{len(m.group(0)) // len(IMG_CONTEXT)}", text)


def render_row(batch: dict, row: int, decode) -> str:
  """Row `row` of a batch as text: ⟦predicted⟧ tokens, ┃ between samples, padding counted."""
  ids, labels = batch["input_ids"][row], batch["labels"][row]
  tile_seg = batch["tile_segment_ids"][row] if "tile_segment_ids" in batch else None
  seg = batch["segment_ids"][row]
  out = []
  for s in range(1, int(seg.max()) + 1):
    at = [int(i) for i in (seg == s).nonzero()[0]]
    # Token t is predicted when the label of t-1 (its target) is not -100.
    target = [False] + [labels[i] != -100 for i in at[:-1]]
    runs, start = [], 0
    for k in range(1, len(at) + 1):
      if k == len(at) or target[k] != target[start]:
        text = _squeeze_images(decode([ids[i] for i in at[start:k]]))
        runs.append(f"⟦{text}⟧" if target[start] else text)
        start = k
    slots = [] if tile_seg is None else [int(i) for i in (tile_seg == s).nonzero()[0]]
    tiles = f", image tiles {slots[0]}..{slots[-1]} ({len(slots)})" if slots else ""
    out.append(f"┃ sample {s}: {len(at)} tokens, {sum(target)} with loss, positions "
               f"{batch['positions'][row][at[0]]}..{batch['positions'][row][at[-1]]}{tiles}\n"
               + "".join(runs))
  pad = int((seg == 0).sum())
  out.append(f"┃ padding: {pad} tokens" + (
      "" if tile_seg is None else
      f"; tile slots used {int((tile_seg > 0).sum())} of {len(tile_seg)}"))
  return "\n".join(out)


def format_stats(stats: dict) -> str:
  cols = ("samples", "tokens", "loss_tokens", "truncated", "dropped_image_cut", "bad",
          "image_samples")
  if stats.get("image_samples"):
    cols += ("image_tiles", "dropped_tile_bound")
  width = {c: max(18, len(c) + 2) for c in cols}
  lines = [f"{'dataset':<24}" + "".join(f"{c:>{width[c]}}" for c in cols)]
  for name, d in stats["datasets"].items():
    lines.append(f"{name:<24}" + "".join(f"{d[c]:>{width[c]},}" for c in cols))
    for loc in d["bad_locations"]:
      lines.append(f"    bad: {loc}")
  lines.append(
      f"\npack_level={stats['pack_level']} pack_max_length={stats['pack_max_length']}: "
      f"{stats['packs']:,} packs, efficiency {stats['pack_efficiency']:.4f}\n"
      f"global_batch_size={stats['rows_per_step']}: {stats['steps_per_epoch']:,} optimizer "
      f"steps per epoch " + (
          f"(round_up: ceil(packs / batch); the last batch topped up with "
          f"{stats['packs_repeated_per_epoch']} pack(s) from the start of the epoch's order)"
          if stats["round_up"] else
          f"({stats['packs_dropped_per_epoch']} pack(s) of the last incomplete batch left out "
          "each epoch)") +
      (f"\ngroup_by_length: groups of {stats['group_rows']} packs of similar attention cost "
       "per micro-batch" if stats["group_by_length"] else ""))
  if stats.get("image_samples"):
    lines.append(
        f"images: {stats['image_samples']:,} image samples, {stats['image_tiles']:,} tiles of "
        f"{stats['image_size']}x{stats['image_size']} in {stats['packs_with_images']:,} "
        f"pack(s); max_tiles_per_pack={stats['max_tiles_per_pack']}: tiles per pack max "
        f"{stats['tiles_per_pack_max']}, mean {stats['tiles_per_pack_mean']:.2f} (tile slots "
        f"used {stats['tile_slot_use']:.3f}); {stats['packs_closed_by_tile_limit']:,} pack(s) "
        f"closed early by the tile limit; {stats['dropped_tile_bound']:,} sample(s) dropped "
        "for having more tiles than a pack holds")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  # pylint: disable=import-outside-toplevel
  from jaxtune.config import ConfigError, resolve
  from jaxtune.data.sources import DataError
  from jaxtune.parallel.mesh import AXES
  from jaxtune.train import build
  recipe = _CONFIG.value
  try:
    devices = _DEVICES.value or math.prod(max(1, int(recipe.mesh[axis])) for axis in AXES)
    resolved = resolve(recipe, devices)
    # Pixels are decoded only for --show_row's row.
    data = build.build_data(resolved, resolved.cfg.tokenizer_path, role="train")
  except (ConfigError, DataError) as e:
    print(f"jaxtune.data: {e}", file=sys.stderr)
    sys.exit(2)
  if _JSON.value:
    print(json.dumps(data.stats, indent=2))
  else:
    print(format_stats(data.stats))
  if _ROW.value is not None:
    step, row = divmod(_ROW.value, data.rows)
    if step >= data.steps_per_epoch:
      print(f"jaxtune.data: row {_ROW.value} is beyond the epoch's "
            f"{data.steps_per_epoch * data.rows} rows", file=sys.stderr)
      sys.exit(2)
    # Only this row is built (a batch of pixel tiles can be large).
    pack = data.epoch_order(_EPOCH.value)[step * data.rows + row]
    print(f"\nepoch {_EPOCH.value}, step {step}, row {row} (pack {pack}; data-parallel size "
          f"{resolved.data_parallel} on {devices} device(s)):")
    decode = getattr(data.encoder, "decode_marked", data.encoder.decode)
    print(render_row(data.pack_rows([pack]), 0, decode))


if __name__ == "__main__":
  app.run(main)
