"""The training loop: owns the run directory, logging, checkpoints and HF exports.

Everything numeric happens in the jit-compiled `train_step`; this module feeds it batches,
keeps count of steps and epochs, and decides when to save. `Trainer(config).fit()` works the
same from the command line (jaxtune.main) and from a notebook.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict
from tqdm import tqdm

import jaxtune
from jaxtune import config as config_lib
from jaxtune import models
from jaxtune.data.pipeline import SFTData
from jaxtune.data.tokenizer import load_tokenizer
from jaxtune.hf.export import export_hf, read_hf_dtype
from jaxtune.hf.load import load_hf_weights
from jaxtune.parallel.mesh import make_mesh
from jaxtune.parallel.sharding import batch_sharding
from jaxtune.train import metrics as metrics_lib
from jaxtune.train.checkpoint import Checkpointer
from jaxtune.train.optim import lr_schedule, make_optimizer
from jaxtune.train.prefetch import prefetch_to_device
from jaxtune.train.state import abstract_train_state, new_train_state
from jaxtune.train.step import BATCH_KEYS, compile_train_step

log = logging.getLogger("jaxtune")

_MAX_CONSECUTIVE_SKIPS = 10


class Trainer:
  """Fine-tunes `config.model` on `config.data`; `fit()` runs to the end and returns a summary."""

  def __init__(self, config: ConfigDict):
    self.cfg = config_lib.validate(config, num_devices=jax.device_count())
    self.run_dir: str | None = None
    self._stop_signal: int | None = None

  # ---- set-up ------------------------------------------------------------------------------

  def _make_run_dir(self) -> tuple[str, bool]:
    """A new timestamped run dir, or with auto_resume the newest one holding a checkpoint."""
    work_dir = os.path.abspath(self.cfg.work_dir)
    if self.cfg.auto_resume and os.path.isdir(work_dir):
      runs = sorted(d for d in os.listdir(work_dir)
                    if os.path.isdir(os.path.join(work_dir, d, "checkpoints")))
      if runs:
        return os.path.join(work_dir, runs[-1]), True
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.join(work_dir, stamp)
    suffix = 1
    while os.path.exists(run_dir):
      run_dir = os.path.join(work_dir, f"{stamp}-{suffix}")
      suffix += 1
    return run_dir, False

  def _write_run_info(self) -> None:
    with open(os.path.join(self.run_dir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config_lib.to_json(self.cfg))
    try:
      rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                           cwd=os.path.dirname(jaxtune.__file__), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      rev = ""
    info = dict(jaxtune_version=jaxtune.__version__, git_revision=rev or None,
                jax_version=jax.__version__, devices=[str(d) for d in jax.devices()],
                process_count=jax.process_count(), started=datetime.datetime.now().isoformat())
    with open(os.path.join(self.run_dir, "run_info.json"), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=2)

  def _setup_logging(self) -> None:
    handler = logging.FileHandler(os.path.join(self.run_dir, "train.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    self._log_handler = handler

  def _on_signal(self, signum, _frame) -> None:
    log.warning("received %s: saving a checkpoint at the next step boundary, then stopping",
                signal.Signals(signum).name)
    self._stop_signal = signum

  # ---- the run -----------------------------------------------------------------------------

  def fit(self) -> dict:
    cfg = self.cfg
    self.run_dir, resuming = self._make_run_dir()
    is_main = jax.process_index() == 0
    os.makedirs(self.run_dir, exist_ok=True)
    self._setup_logging()
    if is_main:
      self._write_run_info()
    log.info("run directory: %s", self.run_dir)

    mesh = make_mesh(config_lib.mesh_shape(cfg, jax.device_count()))
    with jax.set_mesh(mesh):
      return self._train(mesh, is_main, resuming)

  def _train(self, mesh, is_main: bool, resuming: bool) -> dict:
    cfg = self.cfg
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    data = SFTData(cfg.data, tokenizer, global_batch_size=cfg.global_batch_size,
                   process_index=jax.process_index(), process_count=jax.process_count())
    if data.steps_per_epoch < 1:
      raise config_lib.ConfigError(
          f"the data gives {data.stats.get('packs')} packed rows, fewer than global_batch_size "
          f"({cfg.global_batch_size}): lower global_batch_size or add data.")
    total_steps = cfg.total_steps or cfg.epoch_num * data.steps_per_epoch
    dp = config_lib.data_parallel_size(cfg, jax.device_count())
    num_micro = cfg.global_batch_size // (dp * cfg.data.micro_batch_size)

    schedule = lr_schedule(cfg.lr, cfg.optim.lr, total_steps)
    optimizer = make_optimizer(cfg.optim, schedule)
    model_kwargs = dict(param_dtype=jnp.dtype(cfg.param_dtype),
                        compute_dtype=jnp.dtype(cfg.compute_dtype), remat=cfg.remat,
                        attention=cfg.attention)
    checkpointer = Checkpointer(os.path.join(self.run_dir, "checkpoints"),
                                max_to_keep=cfg.checkpoint_maxkeep)

    abstract = models.abstract_model(cfg.model, mesh, seed=cfg.seed, **model_kwargs)
    graphdef, abstract_params = nnx.split(abstract)
    restored = (checkpointer.restore_latest(abstract_train_state(abstract_params, optimizer,
                                                                 mesh))
                if resuming else None)
    if restored is not None:
      start_step, state, meta = restored
      epoch, step_in_epoch = meta["epoch"], meta["step_in_epoch"]
      consumed_tokens = meta["consumed_tokens"]
      log.info("resumed from checkpoint at step %d (epoch %d, step %d in epoch)",
               start_step, epoch + 1, step_in_epoch)
    else:
      start_step, epoch, step_in_epoch, consumed_tokens = 0, 0, 0, 0
      if cfg.load_from:
        model = load_hf_weights(abstract, cfg.load_from)
        log.info("loaded weights from %s", cfg.load_from)
      else:
        model = models.create_model(cfg.model, mesh, seed=cfg.seed, **model_kwargs)
      graphdef, params = nnx.split(model)
      state = new_train_state(params, optimizer, mesh)
      del model
    step_fn = compile_train_step(state, graphdef=graphdef, loss_cfg=cfg.loss,
                                 optimizer=optimizer, schedule=schedule, num_micro=num_micro,
                                 batch_sharding=batch_sharding(mesh))

    metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
    if is_main:
      metrics_lib.truncate_jsonl(metrics_path, start_step)
    writer = metrics_lib.MetricsWriter(metrics_path, enabled=is_main)
    hf_dtype = read_hf_dtype(cfg.load_from) if cfg.load_from else cfg.param_dtype
    n_params = models.param_count(cfg.model)
    peak = metrics_lib.peak_flops_per_device()
    n_dev = jax.device_count()
    log.info("model %s: %.3fM parameters; %d devices, mesh %s; %d steps (%d per epoch), "
             "%d micro-batches per step; %d tokens per row", cfg.model.type, n_params / 1e6,
             n_dev, dict(mesh.shape), total_steps, data.steps_per_epoch, num_micro,
             cfg.data.pack_max_length)

    previous_handlers = {s: signal.signal(s, self._on_signal)
                         for s in (signal.SIGTERM, signal.SIGINT)}
    step = start_step
    totals = dict(tokens=0, time=0.0, mfu=0.0, steps=0)
    skipped_in_a_row = 0
    bar = tqdm(total=total_steps, initial=start_step, disable=not (cfg.progress_bar and is_main),
               dynamic_ncols=True, desc="train")

    def save_checkpoint():
      checkpointer.save(step, state, dict(epoch=epoch, step_in_epoch=step_in_epoch,
                                          consumed_tokens=consumed_tokens))

    try:
      while step < total_steps and self._stop_signal is None:
        host_batches = ({k: b[k] for k in BATCH_KEYS}
                        for b in data.batches(epoch, start_step=step_in_epoch))
        batches = prefetch_to_device(host_batches, batch_sharding(mesh))
        for batch, host_batch in batches:
          t0 = time.perf_counter()
          state, out = step_fn(state, batch)
          out = jax.device_get(out)
          step_time = time.perf_counter() - t0
          step += 1
          step_in_epoch += 1
          tokens = int(out["tokens"])
          consumed_tokens += tokens
          flops = metrics_lib.train_flops(
              cfg.model, tokens,
              metrics_lib.sum_sq_segment_lengths(host_batch["segment_ids"]) * jax.process_count())
          record = dict(step=step, epoch=epoch + 1, loss=float(out["loss"]),
                        loss_tokens=int(out["loss_tokens"]), tokens=tokens, lr=float(out["lr"]),
                        grad_norm=float(out["grad_norm"]), step_time=step_time,
                        tokens_per_sec=tokens / step_time,
                        tokens_per_sec_per_device=tokens / step_time / n_dev,
                        mfu=flops / step_time / (peak * n_dev),
                        consumed_tokens=consumed_tokens, skipped=bool(out["skipped"]),
                        **metrics_lib.device_memory_gib())
          writer.write(record)
          if step > start_step + 1:  # the first step includes compilation
            totals["tokens"] += tokens
            totals["time"] += step_time
            totals["mfu"] += record["mfu"]
            totals["steps"] += 1
          skipped_in_a_row = skipped_in_a_row + 1 if record["skipped"] else 0
          if record["skipped"]:
            log.warning("step %d: loss %s / grad norm %s not finite; update skipped", step,
                        record["loss"], record["grad_norm"])
          if skipped_in_a_row >= _MAX_CONSECUTIVE_SKIPS:
            raise FloatingPointError(
                f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient (last: "
                f"step {step}); stopping. Lower optim.lr or check the data.")
          bar.update(1)
          bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                          tok_s=f"{record['tokens_per_sec']:.0f}")
          if step % cfg.log_interval == 0:
            log.info("step %d/%d epoch %d loss %.4f grad_norm %.3f lr %.3e tokens/s %.0f "
                     "mfu %.3f", step, total_steps, epoch + 1, record["loss"],
                     record["grad_norm"], record["lr"], record["tokens_per_sec"], record["mfu"])
          if step_in_epoch >= data.steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
          if step >= total_steps or self._stop_signal is not None:
            break
          if cfg.checkpoint_interval > 0 and step % cfg.checkpoint_interval == 0:
            save_checkpoint()
          if cfg.hf_interval > 0 and step % cfg.hf_interval == 0:
            self._export(graphdef, state, step, hf_dtype)
          if step_in_epoch == 0:
            break  # next epoch: a new shuffle
        batches.close()
      if step > start_step or restored is None:
        save_checkpoint()
      checkpointer.wait()
      if self._stop_signal is None:
        export_dir = self._export(graphdef, state, step, hf_dtype)
      else:
        export_dir = None
        log.warning("stopped by signal at step %d; checkpoint saved. Resume with "
                    "--config.auto_resume=True and the same work_dir (%s).", step, cfg.work_dir)
    finally:
      bar.close()
      writer.close()
      checkpointer.close()
      for s, h in previous_handlers.items():
        signal.signal(s, h)

    summary = dict(
        run_dir=self.run_dir, steps=step, total_steps=total_steps, epochs=epoch + (step_in_epoch > 0),
        consumed_tokens=consumed_tokens, train_time_s=round(totals["time"], 3),
        tokens_per_sec_per_device=(totals["tokens"] / totals["time"] / n_dev
                                   if totals["time"] else None),
        mean_mfu=totals["mfu"] / totals["steps"] if totals["steps"] else None,
        hf_export=export_dir, stopped_by_signal=self._stop_signal is not None)
    log.info("summary: %s", json.dumps(summary))
    log.removeHandler(self._log_handler)
    self._log_handler.close()
    return summary

  def _export(self, graphdef, state, step: int, dtype: str) -> str:
    """Writes hf-<step>/, re-points hf-latest at it, and prunes beyond hf_max_keep."""
    out_dir = os.path.join(self.run_dir, f"hf-{step}")
    model = nnx.merge(graphdef, state.params)
    export_hf(model, self.cfg.model, out_dir, dtype=dtype, tokenizer_path=self.cfg.tokenizer_path)
    if jax.process_index() == 0:
      link = os.path.join(self.run_dir, "hf-latest")
      tmp = link + ".tmp"
      if os.path.lexists(tmp):
        os.remove(tmp)
      os.symlink(os.path.basename(out_dir), tmp)
      os.replace(tmp, link)
      exports = sorted((d for d in os.listdir(self.run_dir)
                        if d.startswith("hf-") and d[3:].isdigit()), key=lambda d: int(d[3:]))
      for old in exports[:-self.cfg.hf_max_keep] if self.cfg.hf_max_keep > 0 else []:
        shutil.rmtree(os.path.join(self.run_dir, old), ignore_errors=True)
    log.info("HF export written to %s", out_dir)
    return out_dir
