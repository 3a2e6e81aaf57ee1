"""The embedded default recipe (also what `python -m jaxtune.main` runs with no --config)."""

from jaxtune.recipes.sft_mini import get_config  # noqa: F401
