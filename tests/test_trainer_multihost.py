"""Two processes forming one JAX job on the CPU (gloo collectives, one CPU device each): a SIGTERM
seen by one process only stops both after the same step, with one shared run directory and
one checkpoint; auto_resume then continues both to the end."""

import json
import os
import socket
import subprocess

import pytest

from jaxtune.config import dataset, to_json
from test_trainer_utils import (python, read_metrics, subprocess_env, tiny_config,
                                use_compile_cache, write_chats)

_DRIVER = """
import json, os, signal, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[3], num_processes=2, process_id=int(sys.argv[2]))
from ml_collections import ConfigDict
from jaxtune.train import observability
from jaxtune.train.trainer import Trainer

cfg = ConfigDict(json.loads(sys.argv[1]))
if jax.process_index() == 1 and not cfg.auto_resume:  # only process 1 is told to stop
  log_step = observability.RunMonitor.log_step
  def log_then_signal(self, record):
    log_step(self, record)
    if record["step"] == 2:
      os.kill(os.getpid(), signal.SIGTERM)
  observability.RunMonitor.log_step = log_then_signal
print("SUMMARY " + json.dumps(Trainer(cfg).fit()))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes(cfg, cwd):
  env = {**subprocess_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  address = f"localhost:{_free_port()}"
  procs = [subprocess.Popen([python(), "-c", _DRIVER, to_json(cfg), str(i), address], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [json.loads(out[out.index("SUMMARY ") + 8:].splitlines()[0]) for out, _ in outs], outs


@pytest.mark.slow
def test_one_process_signalled_both_stop_at_the_same_step_and_resume(tmp_path,
                                                                     tmp_path_factory):
  use_compile_cache(tmp_path_factory)
  cfg = tiny_config(str(tmp_path), tensorboard=False, eval_interval=2)
  cfg.eval_datasets = [dataset("held", write_chats(str(tmp_path / "held.jsonl"), 6, seed=1))]
  summaries, outs = _run_two_processes(cfg, tmp_path)
  assert [s["steps"] for s in summaries] == [2, 2]
  assert all(s["stopped_by_signal"] for s in summaries)
  assert summaries[0]["run_dir"] == summaries[1]["run_dir"]
  run_dir = summaries[0]["run_dir"]
  assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["2"]
  assert "received SIGTERM" in outs[1][1] and "received SIGTERM" not in outs[0][1]
  assert "stopped by a signal on another process after step 2" in outs[0][1]
  # Both processes computed the same eval loss over their shares of the eval set.
  assert summaries[0]["eval_loss_held"] == summaries[1]["eval_loss_held"]

  cfg.auto_resume = True
  summaries, _ = _run_two_processes(cfg, tmp_path)
  assert [(s["run_dir"], s["steps"], s["steps_this_session"]) for s in summaries] == [
      (run_dir, 6, 4)] * 2
  assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 7))
