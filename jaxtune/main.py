"""Command line: `python -m jaxtune.main --config=configs/<recipe>.py[:arg] [--config.a.b=v]`.

Without --config it runs the embedded default recipe (a miniature Qwen3 on shipped data), which
finishes in a few minutes on a laptop CPU.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_RECIPE = os.path.join(os.path.dirname(__file__), "recipes", "sft_mini.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_RECIPE, "Recipe file defining get_config(arg=None).", lock_config=True)


def main(argv) -> None:
  del argv
  # Imported here so that --help and config errors come back before JAX starts.
  from jaxtune.config import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxtune.train.trainer import Trainer  # pylint: disable=import-outside-toplevel
  try:
    trainer = Trainer(_CONFIG.value)
  except ConfigError as e:
    print(f"jaxtune: configuration error: {e}", file=sys.stderr)
    sys.exit(2)
  summary = trainer.fit()
  print(json.dumps(summary, indent=2))


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
