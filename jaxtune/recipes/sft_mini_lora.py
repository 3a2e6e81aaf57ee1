"""The seeds' Intern-S1-mini recipe (`jaxtune.recipes.sft_mini`) with LoRA, the way Intern-S1's
fine-tuning guide runs it: vision tower and projector frozen, LoRA (rank 16, alpha 32) on
every linear layer of the language model (the seven projections of each decoder layer: the
default `lora.targets`), the base frozen.

    python -m jaxtune.main --config=configs/sft_mini_lora.py
        the miniature (random base, bundled chats and pictures), a few minutes on a CPU.
    python -m jaxtune.main --config=configs/sft_mini_lora.py:load_from=DIR[,text=..][,image=..]
        the real run on Intern-S1-mini from DIR. Add --config.lora.quantize_base=nf4 for QLoRA.

Each export step writes `<run>/hf-<step>/` (the merged model) and `<run>/adapter-<step>/`
(a PEFT adapter for `peft.PeftModel.from_pretrained(base, dir)`); see docs/training.md.
"""

from jaxtune.recipes import sft_mini

RANK, ALPHA = 16, 32.0


def get_config(arg=None):
  c = sft_mini.get_config(arg)
  c.lora.rank = RANK
  c.lora.alpha = ALPHA
  c.lora.dropout = 0.05
  c.work_dir = "work_dirs/sft_mini_lora"
  if not sft_mini.parse_arg(arg):  # the miniature: the adapters start at zero, move them
    c.optim.lr = 1e-2
  else:
    c.optim.lr = 1e-4  # LoRA's usual rate (a full fine-tune of the same model: 1e-6)
  return c
