"""The training loop: `Trainer(config).fit()`, the same from the command line and a notebook.

Everything numeric happens in the jit-compiled train step (jaxtune.train.step). The trainer
builds what it needs through jaxtune.train.build (data, model, optimizer, step; the planner
builds the same), fills the state (fresh, from HF weights or restored from a checkpoint), then
runs one loop that owns the schedule of everything around the step:

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
from ml_collections import ConfigDict

from jaxtune import config as config_lib
from jaxtune import models
from jaxtune.data.pipeline import SFTData
from jaxtune.data.sources import DataError
from jaxtune.data.encoders import open_encoder
from jaxtune.hf.export import read_hf_dtype
from jaxtune.models import load_hf_weights
from jaxtune.train import build, logs, lora_run, multihost, rundir, startup_checks
from jaxtune.train import metrics as metrics_lib
from jaxtune.train.checkpoint import CheckpointError, Checkpointer
from jaxtune.train.eval import Evaluator
from jaxtune.train.hf_exports import HFExporter
from jaxtune.train.nonfinite import NonFiniteGuard
from jaxtune.train.observability import Profiler, RunMonitor, log_summary
from jaxtune.train.preemption import StopRequest
from jaxtune.train.prefetch import prefetch_to_device
from jaxtune.train.state import new_train_state, split_model
from jaxtune.train.step import TrainState

log = logging.getLogger("jaxtune")

class Position(NamedTuple):
  step: int                 # trainer steps done (batches consumed, skipped ones included)
  consumed_tokens: int


class Trainer:
  """Fine-tunes `config.model` on `config.data`; `fit()` runs to the end and returns a summary."""

  def __init__(self, config: ConfigDict):
    logs.quiet_libraries()  # before JAX starts its backends and Orbax its managers
    self.resolved = config_lib.resolve(config, jax.device_count())
    self.cfg = self.resolved.cfg
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
          mesh = build.make_run_mesh(self.resolved)
          with build.run_context(self.resolved, mesh):
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
    data = build.build_data(self.resolved, encoder, role="train", mesh=mesh)
    _check_same_data(data)
    self.vocabulary = startup_checks.check_data(cfg, vocabulary, data)  # the data's ids too
    total_steps = cfg.total_steps or cfg.epoch_num * data.steps_per_epoch
    # Tile slots: the packs' actual maximum (at most the bound the planner sizes).
    run = build.build_run(self.resolved, mesh, total_steps=total_steps,
                          max_tiles=data.max_tiles)
    checkpointer = self._checkpointer = Checkpointer(os.path.join(self.run_dir, "checkpoints"),
                                                      max_to_keep=cfg.checkpoint_maxkeep)
    multihost.set_run(total_steps=total_steps, checkpoints=checkpointer.directory,
                      drain=checkpointer.drain)
    state, position = self._initial_state(start, checkpointer, data, run)
    multihost.note_step(position.step)
    log.info("model %s: %.3fM parameters; %d device(s), mesh %s; %d steps (%d per epoch), "
             "%d micro-batch(es) per step, %d tokens per row", cfg.model.type,
             models.param_count(cfg.model) / 1e6, jax.device_count(), dict(mesh.shape),
             total_steps, data.steps_per_epoch, run.num_micro, cfg.data.pack_max_length)
    if position.step >= total_steps:
      log.info("the run is already complete (step %d of %d): nothing to do", position.step,
               total_steps)
    loop = _Loop(self, data, encoder, run, checkpointer, is_main)
    return loop.run(state, position, resumed_from=start.checkpoint_dir)

  def _initial_state(self, start: rundir.Start, checkpointer: Checkpointer, data: SFTData,
                     run: build.Run) -> tuple[TrainState, Position]:
    """Restored from a checkpoint (all of it or the weights), from HF weights, or random."""
    cfg = self.cfg
    optimizer, mesh, model_def = run.optimizer, run.mesh, run.model_def
    lora_on = lora_run.enabled(cfg)
    if start.checkpoint_dir is not None:
      abstract = run.abstract_state
      if lora_on:  # a LoRA checkpoint holds the adapters; the base is rebuilt below
        abstract = lora_run.restore_target(model_def, abstract)
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
      if lora_on:
        base = lora_run.start_model(cfg, run, self.resolved.model_kwargs, init_adapters=False)
        restored = restored._replace(params=lora_run.with_base(model_def, restored.params, base))
        log.info("LoRA: the base rebuilt from %s, the adapters restored",
                 cfg.load_from or "the seed")
      if start.weights_only:
        log.info("loaded the weights of %s (new optimizer state, schedule and data order)",
                 where)
        return new_train_state(restored.params, optimizer, mesh, model_def), Position(0, 0)
      # The recipe was compared before the restore (rundir.check_recipe). Exact resume needs
      # the same batches: this raises if the data pipeline differs.
      data.check_state(_data_state_of_this_process(restored.progress))
      state = TrainState(params=restored.params, opt_state=restored.optimizer["opt_state"],
                         step=restored.optimizer["step"])
      if start.own and jax.process_index() == 0:  # restored: the run now has this recipe
        rundir.write_snapshot(self.run_dir, cfg, start)
      log.info("resumed from %s (step %d, epoch %d, step %d in that epoch)", where,
               restored.step, restored.progress["epoch"] + 1, restored.progress["step_in_epoch"])
      return state, Position(restored.step, int(restored.progress["consumed_tokens"]))
    if lora_on:
      model = lora_run.start_model(cfg, run, self.resolved.model_kwargs)
      if cfg.load_from:
        log.info("loaded the LoRA base from %s", cfg.load_from)
    elif cfg.load_from:
      model = load_hf_weights(run.abstract_model(), cfg.load_from)
      log.info("loaded weights from %s", cfg.load_from)
    else:
      model = models.create_model(cfg.model, mesh, **self.resolved.model_kwargs)
    _, params = split_model(model)
    return new_train_state(params, optimizer, mesh, model_def), Position(0, 0)


class _Loop:
  """One training session: the loop and the schedule of everything around the step."""

  def __init__(self, trainer: Trainer, data: SFTData, encoder: TokenEncoder, run: build.Run,
               checkpointer: Checkpointer, is_main: bool):
    self.cfg, self.run_dir, self.started = trainer.cfg, trainer.run_dir, trainer.started
    self.resolved = trainer.resolved
    self.vocabulary = trainer.vocabulary  # the start-up id check, for the non-finite guard
    self.parts, self.mesh, self.model_def = run, run.mesh, run.model_def
    self.data, self.encoder = data, encoder
    self.family = models.family(self.cfg.model.type)
    self.total_steps, self.checkpointer, self.is_main = run.total_steps, checkpointer, is_main
    self.n_devices = jax.device_count()
    self.peak_flops = metrics_lib.peak_flops_per_device()
    cfg = self.cfg
    self.exporter = HFExporter(
        self.run_dir, cfg.model, tokenizer_path=cfg.tokenizer_path, max_keep=cfg.hf_max_keep,
        dtype=read_hf_dtype(cfg.load_from) if cfg.load_from else cfg.param_dtype,
        source_dir=cfg.load_from, lora=lora_run.export_spec(cfg))
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

  def _compile(self):
    """The train step compiled ahead of time, so that step 1's time is its own."""
    t0 = time.perf_counter()
    compiled = self.parts.compile()
    self.compile_time = time.perf_counter() - t0
    log.info("train step compiled in %.1f s", self.compile_time)
    return compiled

  def _train(self, state: TrainState, position: Position, monitor: RunMonitor,
             stop: StopRequest) -> tuple[TrainState, Position]:
    """Steps from `position` to the end or to a stop request; returns the state and where."""
    cfg = self.cfg
    step_fn = self._compile()
    evaluator = (Evaluator(self.resolved, self.mesh, self.model_def, tokenizer=self.encoder)
                 if cfg.eval_datasets else None)
    guard = NonFiniteGuard(cfg.max_consecutive_nonfinite, total_steps=self.total_steps,
                           vocabulary=self.vocabulary)
    profiler = Profiler(self.run_dir, tuple(cfg.profile_steps))
    step, tokens = position
    epoch, in_epoch = divmod(step, self.data.steps_per_epoch)
    host_batches = ({k: b[k] for k in self.parts.batch_layout}
                    for b in self.data.iterator(epoch, in_epoch))
    batches = prefetch_to_device(host_batches, self.parts.batch_sharding, first_step=step + 1)
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
    data_state = self.data.state_at(epoch, in_epoch)
    # Process 0 writes the JSON; each host's share of the data has its own hash.
    hashes = multihost.allgather_text(str(data_state.get("data_hash", "")))
    progress = dict(step=step, epoch=epoch, step_in_epoch=in_epoch,
                    consumed_tokens=consumed_tokens, total_steps=self.total_steps,
                    skipped_steps=skipped, seed=self.cfg.seed, data_seed=self.cfg.data.seed,
                    data=data_state, data_hash_per_process=hashes)
    if lora_run.enabled(self.cfg):  # the adapters and their optimizer state; the base: named
      state = lora_run.saved_state(self.model_def, state)
      progress["base"] = lora_run.base_reference(self.cfg)
    self.checkpointer.save(step, state, progress, self.cfg.to_dict())


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
