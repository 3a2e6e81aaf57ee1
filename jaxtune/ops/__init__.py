"""Numerics and kernels: attention, rope, norms, resize, MoE routing, the chunked loss.

Imports only `jaxtune.parallel` (the logical-axis rules its sharded kernels follow).

Shape letters used in names across the package:
  B batch rows, T tokens per row, D hidden (embed), N query heads, K key/value heads,
  H head dim, F MLP hidden, V vocab, E experts, L layers, S segments.
"""
