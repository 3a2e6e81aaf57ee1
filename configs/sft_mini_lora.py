"""The seeds' Intern-S1-mini recipe with LoRA (jaxtune/recipes/sft_mini_lora.py)."""

from jaxtune.recipes.sft_mini_lora import get_config  # noqa: F401
