"""Orbax checkpoints of the train state plus a JSON sidecar (progress, data position, config).

Orbax writes each step into a temporary directory and renames it when complete, so a crash
while saving leaves no half-written checkpoint under a step's name. A checkpoint that still
fails to restore (a damaged disk, files deleted by hand) is skipped with a warning and the
next older one is tried.
"""

from __future__ import annotations

import logging

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores (state pytree, meta dict) pairs keyed by optimizer step."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep if max_to_keep > 0 else None,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.directory = directory
    self._manager = ocp.CheckpointManager(directory, options=options)

  def save(self, step: int, state, meta: dict) -> None:
    """Starts saving (asynchronously); meta must be JSON-serialisable."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
    """Restores the newest checkpoint that loads; None when there is none.

    abstract_state: the state's structure as jax.ShapeDtypeStruct with shardings, so every
    array is read straight into its place on the mesh.
    """
    for step in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return step, restored["state"], dict(restored["meta"])
      except Exception as e:  # pylint: disable=broad-except
        log.warning("checkpoint %s/%d cannot be restored (%s: %s); trying an older one",
                    self.directory, step, type(e).__name__, e)
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)
