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
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # never claim an accelerator from here

from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from jaxtune.data.inspect import format_stats, render_row  # pylint: disable=wrong-import-position

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
