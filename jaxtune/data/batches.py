"""The batches stage: which packs make the rows of each step, and the checkpointable position.

Every epoch orders the packs with (data.seed, epoch): shuffled, or length-grouped (XTuner's
LengthGroupedSampler, laid out so that each micro-batch's group lands on different ranks), cut
to whole batches or topped up from the order's start (round_up). Step k takes
order[k*R:(k+1)*R] (R rows), so any step is found in O(1) and a resumed run sees exactly the
batches of an uninterrupted one; with global_order each host then takes its `host_rows`.

A position (epoch, step) is saved with the pipeline's signature and restored only into the
same pipeline (`state`, `position_of`); `DataIterator` is the endless iterator over epochs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from jaxtune.data import packing
from jaxtune.data.corpus import rng
from jaxtune.data.sources import DataError


def rank_layout(global_batch_size: int, process_count: int, data_parallel: int | None,
                micro_batch_size: int) -> tuple[int, int]:
  """(G, A) for one host's rows: G packs run side by side on this host's data-parallel ranks in
  each of the step's A micro-batches (rows = G x A). Without data_parallel, every row is its own
  rank (A = 1)."""
  rows = global_batch_size // process_count
  if data_parallel is None:
    return rows, 1
  per_pass = int(data_parallel) * max(1, micro_batch_size)
  if per_pass % process_count or global_batch_size % per_pass:
    return rows, 1
  group = per_pass // process_count
  return group, rows // group


def local_steps(packs: int, rows: int, round_up: bool) -> int:
  """round_up (XTuner's default): ceil(packs / rows), the last batch topped up from the start
  of the epoch's order; else packs // rows, the incomplete last batch dropped."""
  return -(-packs // rows) if round_up else packs // rows


def agree_steps(local: int, round_up: bool, process_count: int,
                allgather: Callable[[int], Sequence[int]] | None) -> int:
  """The hosts' common epoch length: the largest (round_up) or smallest of their own."""
  if process_count == 1:
    return local
  if allgather is None:
    allgather = _jax_allgather(process_count)
  agreed = allgather(local)
  return int(max(agreed) if round_up else min(agreed))


def _jax_allgather(count: int) -> Callable[[int], Sequence[int]]:
  from jaxtune.parallel import collectives  # pylint: disable=import-outside-toplevel
  if collectives.process_count() != count:
    raise ValueError(f"process_count={count} but JAX runs {collectives.process_count()} "
                     "process(es); pass allgather= to agree on the epoch length without JAX")
  return collectives.allgather_ints


def pack_flops(plan: packing.PackPlan) -> np.ndarray:
  """Attention cost of each pack: the sum of its segments' squared lengths."""
  pack_of = np.repeat(np.arange(plan.num_packs), np.diff(plan.bounds))
  return np.bincount(pack_of, weights=plan.length.astype(np.float64) ** 2,
                     minlength=plan.num_packs)


@dataclasses.dataclass
class Layout:
  """How one epoch's packs become this host's rows of each step."""
  seed: int
  rows: int                      # rows per step in the order (all hosts' with global_order)
  steps_per_epoch: int
  group_by_length: bool
  group_rows: int                # G: packs side by side in one micro-batch
  micro_steps: int               # A: micro-batches per step
  host_rows: np.ndarray | None   # global_order: this host's rows of each step

  def epoch_order(self, epoch: int, num_packs: int,
                  flops: Callable[[], np.ndarray]) -> np.ndarray:
    """The packs of every row of the epoch, in row order: steps_per_epoch x rows of them.

    The shuffled (or length-grouped) order of the epoch's packs, cut to whole batches
    (round_up=False) or topped up from its start (round_up=True, XTuner's rule: the order
    repeated until the last batch is full). With group_by_length, each batch's rows are laid
    out so that every micro-batch's group of similar packs lands on different ranks.
    `flops()` gives each pack's attention cost (only read when grouping by length)."""
    total = self.steps_per_epoch * self.rows
    if self.group_by_length:
      order = packing.length_grouped_order(flops(), self.rows, self.group_rows,
                                           rng(self.seed, 3, epoch))
    else:
      order = rng(self.seed, 2, epoch).permutation(num_packs)
    order = np.resize(order, total) if num_packs else np.zeros(0, np.int64)  # cyclic: wraps
    if self.group_by_length and self.micro_steps > 1:
      # Position j of a batch (micro-step j // G, rank slot j % G) -> row (j % G) * A + j // G,
      # the row that the trainer's micro-batch split puts there (train.step.split_micro_batches).
      order = order.reshape(-1, self.micro_steps, self.group_rows).transpose(0, 2, 1).reshape(-1)
    return order

  def step_packs(self, order: np.ndarray, step: int) -> np.ndarray:
    """The packs of this host's rows of step `step` of an epoch's order."""
    if not 0 <= step < self.steps_per_epoch:
      raise IndexError(f"step {step} outside epoch of {self.steps_per_epoch} steps")
    packs = order[step * self.rows:(step + 1) * self.rows]
    if self.host_rows is not None and len(packs) == self.rows:  # this host's rows of the batch
      packs = packs[self.host_rows]
    return packs

  def host_order(self, order: np.ndarray) -> np.ndarray:
    """[steps, this host's rows]: the packs this host reads in the epoch."""
    mine = order.reshape(self.steps_per_epoch, self.rows)
    return mine if self.host_rows is None else mine[:, self.host_rows]


def state(signature: dict[str, Any], epoch: int, step: int) -> dict[str, Any]:
  """JSON-serialisable: the position of the next batch and what it is valid for. Step
  steps_per_epoch of an epoch is the same batch as step 0 of the next (either form restores)."""
  return dict(epoch=int(epoch), step=int(step), **signature)


def position_of(signature: dict[str, Any], saved: dict[str, Any]) -> tuple[int, int]:
  """(epoch, step) of a saved state; a DataError when it was saved by another pipeline."""
  diff = {k: (saved.get(k), v) for k, v in signature.items() if saved.get(k) != v}
  if diff:
    raise DataError("the checkpoint's data position does not match this data pipeline "
                    f"(saved vs now: {diff}); resuming would not see the same batches. "
                    "Use the same data, data config, tokenizer and host count.")
  return int(saved["epoch"]), int(saved["step"])


class DataIterator:
  """Endless iterator over epochs; its state (epoch, step) goes into the checkpoint.

  `data` is what it reads: anything with steps_per_epoch, batches(epoch, start_step) and
  signature() (SFTData)."""

  def __init__(self, data, epoch: int = 0, step: int = 0):
    self.data, self.epoch, self.step = data, epoch, step
    self._it: Iterator[dict[str, np.ndarray]] | None = None

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.step >= self.data.steps_per_epoch:
      self.epoch, self.step, self._it = self.epoch + 1, 0, None
    if self._it is None:
      self._it = self.data.batches(self.epoch, self.step)
    batch = next(self._it)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return state(self.data.signature(), self.epoch, self.step)

  def set_state(self, saved: dict[str, Any]) -> None:
    """Moves to a saved position; refuses one from a different pipeline (DataError)."""
    self.epoch, self.step = position_of(self.data.signature(), saved)
    self._it = None
