"""Model FLOPs of a training step, for MFU: the pieces every decoder family shares.

Counted as the model's own work (forward + backward, no rematerialisation): 6 FLOPs per
matmul parameter per token, plus causal attention. Packed samples attend only within
themselves, so attention sums len_i^2 over the samples of each row.
"""

from __future__ import annotations

import numpy as np


def sum_sq_segment_lengths(segment_ids: np.ndarray) -> int:
  """Sum over packed samples of length^2, from [B, T] segment ids (0 = padding)."""
  total = 0
  for row in np.asarray(segment_ids):
    counts = np.bincount(row[row > 0])
    total += int((counts.astype(np.int64) ** 2).sum())
  return total


def decoder_train_flops(matmul_params_per_token: int, cfg, segment_ids: np.ndarray) -> float:
  """6 x params x tokens, plus attention: QK^T and AV each cost 2 x len^2 x N x H per layer
  forward over the causal half (len^2 / 2 pairs), times 3 for forward + backward."""
  segment_ids = np.asarray(segment_ids)
  tokens = int((segment_ids > 0).sum())
  attention = (6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
               * sum_sq_segment_lengths(segment_ids))
  return 6 * matmul_params_per_token * tokens + attention
