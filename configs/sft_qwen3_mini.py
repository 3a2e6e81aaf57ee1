"""The text-only demo: a miniature Qwen3 fine-tuned on shipped chats, on a 2-core CPU."""

from jaxtune.recipes.qwen3_mini import get_config  # noqa: F401
