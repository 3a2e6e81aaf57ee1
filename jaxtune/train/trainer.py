"""The training loop: `Trainer(config).fit()`, the same from the command line and a notebook.

Everything numeric happens in the jit-compiled train step (jaxtune.train.step). The trainer
builds what it needs (data, model, optimizer, state: fresh, from HF weights or restored from a
checkpoint), then runs one loop that owns the schedule of everything around the step:

  next batch -> step -> record -> [eval] -> log -> [checkpoint] -> [HF export] -> [stop?]

The helpers each own one concern: `rundir` (where to write and start from, the config
snapshot), `checkpoint` (Orbax), `hf_exports`, `eval`, `observability` (metrics.jsonl,
TensorBoard, progress bar, profiler, summary), `nonfinite`, `preemption` (SIGTERM/SIGINT),
`multihost` (the cross-process agreements, and a failure on one host stopping every host).
See docs/training.md.
"""

from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from jaxtune import config as config_lib
from jaxtune import models
from jaxtune.data.pipeline import SFTData
from jaxtune.data.sources import DataError
from jaxtune.data.encoders import open_encoder
from jaxtune.hf.export import read_hf_dtype
from jaxtune.hf.load import load_hf_weights
from jaxtune.parallel.mesh import make_mesh
from jaxtune.parallel import sharding
from jaxtune.parallel.sharding import batch_sharding
from jaxtune.train import logs, multihost, rundir, startup_checks
from jaxtune.train import metrics as metrics_lib
from jaxtune.train.checkpoint import CheckpointError, Checkpointer
from jaxtune.train.eval import Evaluator
from jaxtune.train.hf_exports import HFExporter
from jaxtune.train.nonfinite import NonFiniteGuard
from jaxtune.train.observability import Profiler, RunMonitor, log_summary
from jaxtune.train.optim import lr_schedule, make_optimizer
from jaxtune.train.preemption import StopRequest
from jaxtune.train.prefetch import prefetch_to_device
from jaxtune.train.state import abstract_train_state, new_train_state, split_model
from jaxtune.train.step import ModelDef, TrainState, compile_train_step

log = logging.getLogger("jaxtune")

class Position(NamedTuple):
  step: int                 # trainer steps done (batches consumed, skipped ones included)
  consumed_tokens: int


class Trainer:
  """Fine-tunes `config.model` on `config.data`; `fit()` runs to the end and returns a summary."""

  def __init__(self, config: ConfigDict):
    logs.quiet_libraries()  # before JAX starts its backends and Orbax its managers
    self.cfg = config_lib.validate(config, num_devices=jax.device_count())
    self.run_dir: str | None = None
    self.started = 0.0

  def fit(self) -> dict:
    """Trains to the end (or to a SIGTERM/SIGINT stop) and returns the summary.

    With several processes an error on any one of them stops all of them: this process then
    logs the cause and exits with its exit code (jaxtune.launch) instead of raising, since
    the others cannot go on without it (jaxtune.train.multihost).
    """
    self.started = time.perf_counter()
    multihost.watch()
    start = None
    try:
      start = rundir.choose_start(self.cfg)  # process 0 holds the run directory's lock now
      self.run_dir = start.run_dir
      is_main = jax.process_index() == 0
      with logs.run_logging(self.run_dir, is_main=is_main,
                            step_lines_on_console=not self.cfg.progress_bar):
        try:
          if start.lock is not None and start.lock.notice:
            log.warning("%s", start.lock.notice)
          # A resumed run's config.json is rewritten once its checkpoint restored.
          rundir.check_recipe(start, self.cfg)
          if is_main and not start.own:
            rundir.write_snapshot(self.run_dir, self.cfg, start)
          log.info("run directory: %s", self.run_dir)
          mesh = make_mesh(config_lib.mesh_shape(self.cfg, jax.device_count()))
          with jax.set_mesh(mesh), sharding.axis_rules(config_lib.axis_rules(self.cfg)):
            return self._fit(mesh, start, is_main)
        except BaseException as e:  # pylint: disable=broad-except
          if jax.process_count() > 1:
            rundir.release(start)  # multihost.fail exits without unwinding
            multihost.fail(e)  # while train.log is still open; does not return
          logs.log_fatal(e)  # the error and its traceback in train.log (console: jaxtune.main)
          raise
    except BaseException as e:  # pylint: disable=broad-except  (before the log was set up)
      if jax.process_count() > 1:
        rundir.release(start)
        multihost.fail(e)
      rundir.release(start)  # before a failed new run's directory is renamed <name>-failed
      self.run_dir = startup_checks.set_aside_failed_start(self.run_dir)
      raise
    finally:
      rundir.release(start)

  # ---- set-up ------------------------------------------------------------------------------

  def _fit(self, mesh, start: rundir.Start, is_main: bool) -> dict:
    self._checkpointer = None
    try:
      summary = self._fit_with(mesh, start, is_main)
    except BaseException as e:  # pylint: disable=broad-except
      multihost.announce(e)  # first: the other processes stop waiting for this one
      # One process: a save in flight completes (`e` stays the error reported). Several:
      # multihost.fail waits for it, bounded, as the others may be gone.
      if self._checkpointer is not None and jax.process_count() == 1:
        try:
          self._checkpointer.close()
        except Exception as close_error:  # pylint: disable=broad-except
          log.warning("after the error, the checkpoint in flight failed too: %s", close_error)
      raise
    self._checkpointer.close()  # a failed last save raises here
    multihost.set_run()
    return summary

  def _fit_with(self, mesh, start: rundir.Start, is_main: bool) -> dict:
    cfg = self.cfg
    encoder = open_encoder(cfg.tokenizer_path)
    vocabulary = startup_checks.check_tokenizer(cfg, encoder)  # ids vs the model's: exit 2
    if is_main:
      log.info("%s", encoder.describe())
    # The order of one host reading every row, this host taking the rows its devices hold:
    # the batches do not depend on the host count, so a run resumes on another topology.
    dp = config_lib.data_parallel_size(cfg, jax.device_count())
    # data_parallel: length grouping balances the packs of each micro-batch over these ranks.
    data = SFTData(cfg.data, encoder, global_batch_size=cfg.global_batch_size,
                   process_index=jax.process_index(), process_count=jax.process_count(),
                   data_parallel=dp, global_order=True,
                   host_rows=_host_rows(mesh, cfg.global_batch_size),
                   **models.family(cfg.model.type).data_options(cfg.model))
    _check_same_data(data)
    self.vocabulary = startup_checks.check_data(cfg, vocabulary, data)  # the data's ids too
    total_steps = cfg.total_steps or cfg.epoch_num * data.steps_per_epoch
    num_micro = cfg.global_batch_size // (dp * cfg.data.micro_batch_size)
    schedule = lr_schedule(cfg.lr, cfg.optim.lr, total_steps)
    optimizer = make_optimizer(cfg.optim)  # unit lr: the step applies `schedule` itself

    model_kwargs = dict(param_dtype=jnp.dtype(cfg.param_dtype),
                        compute_dtype=jnp.dtype(cfg.compute_dtype), remat=cfg.remat,
                        attention=cfg.attention, seed=cfg.seed)
    model_def, abstract_params = split_model(
        models.abstract_model(cfg.model, mesh, **model_kwargs))
    checkpointer = self._checkpointer = Checkpointer(os.path.join(self.run_dir, "checkpoints"),
                                                      max_to_keep=cfg.checkpoint_maxkeep)
    multihost.set_run(total_steps=total_steps, checkpoints=checkpointer.directory,
                      drain=checkpointer.drain)
    state, position = self._initial_state(start, checkpointer, data, model_def,
                                           abstract_params, optimizer, mesh, model_kwargs)
    multihost.note_step(position.step)
    log.info("model %s: %.3fM parameters; %d device(s), mesh %s; %d steps (%d per epoch), "
             "%d micro-batch(es) per step, %d tokens per row", cfg.model.type,
             models.param_count(cfg.model) / 1e6, jax.device_count(), dict(mesh.shape),
             total_steps, data.steps_per_epoch, num_micro, cfg.data.pack_max_length)
    if position.step >= total_steps:
      log.info("the run is already complete (step %d of %d): nothing to do", position.step,
               total_steps)
    loop = _Loop(self, mesh, data, encoder, model_def, optimizer, schedule, num_micro,
                 total_steps, checkpointer, is_main)
    return loop.run(state, position, resumed_from=start.checkpoint_dir)

  def _initial_state(self, start: rundir.Start, checkpointer: Checkpointer, data: SFTData,
                     model_def: ModelDef, abstract_params, optimizer, mesh, model_kwargs
                     ) -> tuple[TrainState, Position]:
    """Restored from a checkpoint (all of it or the weights), from HF weights, or random."""
    cfg = self.cfg
    if start.checkpoint_dir is not None:
      abstract = abstract_train_state(abstract_params, optimizer, mesh, model_def)
      if start.own:  # auto_resume: damaged newer checkpoints of this run are moved aside
        restored = checkpointer.restore_latest(abstract, quarantine=True)
      else:
        source = Checkpointer(start.checkpoint_dir, read_only=True)
        try:
          restored = source.restore_latest(abstract, step=start.step,
                                           weights_only=start.weights_only)
        finally:
          source.close()
      if restored is None:
        raise CheckpointError(f"{start.checkpoint_dir} holds no complete checkpoint")
      where = f"{start.checkpoint_dir}/{restored.step}"
      if start.weights_only:
        log.info("loaded the weights of %s (new optimizer state, schedule and data order)",
                 where)
        return new_train_state(restored.params, optimizer, mesh, model_def), Position(0, 0)
      # The recipe was compared before the restore (rundir.check_recipe). Exact resume needs
      # the same batches: this raises if the data pipeline differs.
      data.iterator().set_state(_data_state_of_this_process(restored.progress))
      state = TrainState(params=restored.params, opt_state=restored.optimizer["opt_state"],
                         step=restored.optimizer["step"])
      if start.own and jax.process_index() == 0:  # restored: the run now has this recipe
        rundir.write_snapshot(self.run_dir, cfg, start)
      log.info("resumed from %s (step %d, epoch %d, step %d in that epoch)", where,
               restored.step, restored.progress["epoch"] + 1, restored.progress["step_in_epoch"])
      return state, Position(restored.step, int(restored.progress["consumed_tokens"]))
    if cfg.load_from:
      model = load_hf_weights(models.abstract_model(cfg.model, mesh, **model_kwargs),
                              cfg.load_from)
      log.info("loaded weights from %s", cfg.load_from)
    else:
      model = models.create_model(cfg.model, mesh, **model_kwargs)
    _, params = split_model(model)
    return new_train_state(params, optimizer, mesh, model_def), Position(0, 0)


class _Loop:
  """One training session: the loop and the schedule of everything around the step."""

  def __init__(self, trainer: Trainer, mesh, data: SFTData, encoder: TokenEncoder,
               model_def: ModelDef, optimizer, schedule, num_micro: int, total_steps: int,
               checkpointer: Checkpointer, is_main: bool):
    self.cfg, self.run_dir, self.started = trainer.cfg, trainer.run_dir, trainer.started
    self.vocabulary = trainer.vocabulary  # the start-up id check, for the non-finite guard
    self.mesh, self.data, self.encoder, self.model_def = mesh, data, encoder, model_def
    self.family = models.family(self.cfg.model.type)
    self.batch_layout = self.family.batch_layout(self.cfg.model, self.cfg.global_batch_size,
                                                 self.cfg.data.pack_max_length,
                                                 max_tiles=data.max_tiles)
    self.optimizer, self.schedule, self.num_micro = optimizer, schedule, num_micro
    self.total_steps, self.checkpointer, self.is_main = total_steps, checkpointer, is_main
    self.n_devices = jax.device_count()
    self.peak_flops = metrics_lib.peak_flops_per_device()
    cfg = self.cfg
    self.exporter = HFExporter(
        self.run_dir, cfg.model, tokenizer_path=cfg.tokenizer_path, max_keep=cfg.hf_max_keep,
        dtype=read_hf_dtype(cfg.load_from) if cfg.load_from else cfg.param_dtype,
        source_dir=cfg.load_from)
    self.compile_time = 0.0

  def _due(self, interval: int, step: int) -> bool:
    return step == self.total_steps or (interval > 0 and step % interval == 0)

  def run(self, state: TrainState, position: Position, resumed_from: str | None) -> dict:
    cfg = self.cfg
    monitor = RunMonitor(self.run_dir, total_steps=self.total_steps, start_step=position.step,
                         n_devices=self.n_devices, is_main=self.is_main,
                         progress_bar=cfg.progress_bar, tensorboard=cfg.tensorboard,
                         log_interval=cfg.log_interval, started=self.started, recipe=cfg)
    stop = StopRequest()
    try:
      with stop:
        if position.step < self.total_steps:
          state, position = self._train(state, position, monitor, stop)
      step, tokens = position
      self.checkpointer.wait()  # the last checkpoint commits before the final export starts
      if step == self.total_steps and not os.path.isdir(
          os.path.join(self.run_dir, f"hf-{step}")):  # complete, but stopped before exporting
        self.exporter.export(self.model_def, state.params, step)
    finally:
      monitor.close()

    stopped = stop.signal_name is not None and step < self.total_steps
    if stopped:
      log.warning("stopped by %s after step %d of %d; checkpoint %s/%d is complete. To "
                  "continue, run the same command with --config.auto_resume=True (same "
                  "work_dir: %s), or with --config.resume_from=%s/%d.", stop.signal_name,
                  step, self.total_steps, self.checkpointer.directory, step,
                  os.path.dirname(self.run_dir), self.checkpointer.directory, step)
    saved = self.checkpointer.all_steps()
    latest = os.path.join(self.run_dir, "hf-latest")
    summary = monitor.summary(
        run_dir=self.run_dir, steps=step, total_steps=self.total_steps,
        epochs=-(-step // self.data.steps_per_epoch), consumed_tokens=tokens,
        compile_time_s=round(self.compile_time, 3),
        checkpoint=os.path.join(self.checkpointer.directory, str(saved[-1])) if saved else None,
        hf_export=os.path.realpath(latest) if os.path.lexists(latest) else None,
        resumed_from=resumed_from, stopped_by_signal=stopped)
    log_summary(summary)
    return summary

  def _compile(self, state: TrainState):
    """The train step compiled ahead of time, so that step 1's time is its own."""
    t0 = time.perf_counter()
    sharding = batch_sharding(self.mesh)
    step_fn = compile_train_step(state, model_def=self.model_def, loss_cfg=self.cfg.loss,
                                 optimizer=self.optimizer, schedule=self.schedule,
                                 num_micro=self.num_micro, batch_layout=self.batch_layout,
                                 batch_sharding=sharding,
                                 skip_grad_norm_threshold=self.cfg.optim.skip_grad_norm_threshold)
    abstract_batch = {k: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)
                      for k, (shape, dtype) in self.batch_layout.items()}
    compiled = step_fn.lower(state, abstract_batch).compile()
    self.compile_time = time.perf_counter() - t0
    log.info("train step compiled in %.1f s", self.compile_time)
    return compiled

  def _train(self, state: TrainState, position: Position, monitor: RunMonitor,
             stop: StopRequest) -> tuple[TrainState, Position]:
    """Steps from `position` to the end or to a stop request; returns the state and where."""
    cfg = self.cfg
    step_fn = self._compile(state)
    evaluator = (Evaluator(cfg, self.mesh, self.model_def, tokenizer=self.encoder,
                           data_parallel=config_lib.data_parallel_size(cfg, self.n_devices))
                 if cfg.eval_datasets else None)
    guard = NonFiniteGuard(cfg.max_consecutive_nonfinite, total_steps=self.total_steps,
                           vocabulary=self.vocabulary)
    profiler = Profiler(self.run_dir, tuple(cfg.profile_steps))
    step, tokens = position
    epoch, in_epoch = divmod(step, self.data.steps_per_epoch)
    host_batches = ({k: b[k] for k in self.batch_layout}
                    for b in self.data.iterator(epoch, in_epoch))
    batches = prefetch_to_device(host_batches, batch_sharding(self.mesh), first_step=step + 1)
    monitor.start()
    try:
      while step < self.total_steps:
        t_data = time.perf_counter()
        batch, host = next(batches)
        data_time = time.perf_counter() - t_data
        step += 1
        profiler.before_step(step)
        t_step = time.perf_counter()
        state, out = step_fn(state, batch)
        out = jax.device_get(out)
        step_time = time.perf_counter() - t_step
        profiler.after_step(step)
        tokens += int(out["tokens"])
        multihost.note_step(step)
        record = self._record(step, out, host, step_time, data_time, tokens)
        if evaluator is not None and self._due(cfg.eval_interval, step):
          t_eval = time.perf_counter()
          record.update(evaluator.evaluate(state.params))
          record["eval_time"] = time.perf_counter() - t_eval
        monitor.log_step(record)
        guard.check(record)  # raises after too many non-finite steps in a row
        self.checkpointer.check()  # a background save that failed stops the run here
        stopping = stop.should_stop()
        if self._due(cfg.checkpoint_interval, step) or stopping:
          self._save(step, state, tokens, guard.total)
        # On the way out after a signal only the checkpoint matters (the grace period is
        # short), unless this was the last step: then the run is complete and exports.
        if self._due(cfg.hf_interval, step) and (not stopping or step == self.total_steps):
          if step == self.total_steps:  # a kill during the final export loses only the export
            self.checkpointer.wait()
          self.exporter.export(self.model_def, state.params, step)
        if stopping:
          break
    finally:
      profiler.stop()
      batches.close()
    return state, Position(step, tokens)

  def _record(self, step: int, out: dict, host: dict, step_time: float, data_time: float,
              consumed_tokens: int) -> dict:
    """One metrics.jsonl line: the documented fields first (docs/training.md), then extras."""
    tokens = int(out["tokens"])
    # This host's rows stand for every host's (their FLOPs differ only by their lengths).
    flops = self.family.train_flops(self.cfg.model, host) * jax.process_count()
    return dict(
        step=step, epoch=(step - 1) // self.data.steps_per_epoch + 1, loss=float(out["loss"]),
        loss_tokens=int(out["loss_tokens"]), tokens=tokens, lr=float(out["lr"]),
        grad_norm=float(out["grad_norm"]), step_time=step_time,
        tokens_per_sec=tokens / step_time,
        tokens_per_sec_per_device=tokens / step_time / self.n_devices,
        mfu=metrics_lib.mfu(flops, step_time, self.peak_flops, self.n_devices),
        data_time=data_time, consumed_tokens=consumed_tokens, skipped=bool(out["skipped"]),
        nonfinite=bool(out["nonfinite"]),
        **{k: float(v) for k, v in out["model"].items()},
        **metrics_lib.device_memory_gib(), **metrics_lib.host_memory_gib())

  def _save(self, step: int, state: TrainState, consumed_tokens: int, skipped: int) -> None:
    epoch, in_epoch = divmod(step, self.data.steps_per_epoch)
    data_state = self.data.iterator(epoch, in_epoch).get_state()
    # Process 0 writes the JSON; each host's share of the data has its own hash.
    hashes = multihost.allgather_text(str(data_state.get("data_hash", "")))
    progress = dict(step=step, epoch=epoch, step_in_epoch=in_epoch,
                    consumed_tokens=consumed_tokens, total_steps=self.total_steps,
                    skipped_steps=skipped, seed=self.cfg.seed, data_seed=self.cfg.data.seed,
                    data=data_state, data_hash_per_process=hashes)
    self.checkpointer.save(step, state, progress, self.cfg.to_dict())


def _host_rows(mesh, rows: int) -> np.ndarray:
  """The rows of a global batch that this process's devices hold, in ascending order (the
  order `jax.make_array_from_process_local_data` reads a host's rows in)."""
  indices = batch_sharding(mesh).addressable_devices_indices_map((rows, 1))
  held = {r for index in indices.values() for r in range(*index[0].indices(rows))}
  return np.asarray(sorted(held), np.int64)


def _check_same_data(data: SFTData) -> None:
  """Every process must build the same packs (each reads all of them and takes its rows)."""
  hashes = multihost.allgather_text(data.data_hash)
  if len(set(hashes)) > 1:
    raise DataError(f"the processes see different training data (data hash per process: "
                    f"{hashes}): every host must read the same data.datasets files (a shared "
                    "file system or identical copies), with the same data config and tokenizer.")


def _data_state_of_this_process(progress: dict) -> dict:
  """The saved data position, with this process's own data hash."""
  state, hashes = dict(progress["data"]), progress.get("data_hash_per_process") or []
  if jax.process_index() < len(hashes):
    state["data_hash"] = hashes[jax.process_index()]
  return state
