"""A failure on one host stops every host: two-process jobs (`python -m jaxtune.main` through
scripts/launch_nodes.sh, gloo collectives), one fault each.

For every case: both processes exit within a minute of the fault with exit code 1, each says
what failed on which process (file:line for data, the path for export and checkpoint errors),
and both report the same last step. A process that is still running at the job's deadline is
killed and fails the test as hung: before this, both processes of such a job were still
running after 180 s.
"""

import os
import re

import pytest

from jaxtune.config import dataset
from multihost_jobs import run_nodes as _run_nodes, write_recipe
from test_trainer_utils import tiny_config, use_compile_cache, write_chats

pytestmark = pytest.mark.slow
_STOP_WITHIN_S = 60
_DEADLINE_S = 150  # start-up (~20 s on 2 cores) + a minute, with margin: then it hangs


def run_nodes(*args, **kwargs):
  return _run_nodes(*args, deadline_s=_DEADLINE_S, **kwargs)


def _config(root, **overrides):
  return tiny_config(str(root), tensorboard=False, **overrides)


def _assert_every_process_stopped(job, *causes, code=1):
  tails = "\n".join(f"--- process {i} (exit {c}):\n{err[-2500:]}"
                    for i, (c, err) in enumerate(zip(job.codes, job.stderr)))
  assert None not in job.codes, f"a process hung (killed at the deadline): {job.codes}\n{tails}"
  assert job.codes == [code] * len(job.codes), tails
  assert job.fault_fired is not None, tails  # the planted fault, or the first announcement
  assert max(job.ended) - job.fault_fired < _STOP_WITHIN_S, (max(job.ended) - job.fault_fired,
                                                             tails)
  for err in job.stderr:
    for cause in causes:
      assert re.search(cause, err), (cause, tails)
  steps = job.stop_steps()
  assert None not in steps and len(set(steps)) == 1, (steps, tails)
  return steps[0]


def test_a_malformed_line_in_one_hosts_share_stops_both(tmp_path, tmp_path_factory):
  # Evaluation data is split between the hosts: with one good and one bad line, exactly one
  # host reads the bad one and fails building its share, while the other goes on.
  use_compile_cache(tmp_path_factory)
  cfg = _config(tmp_path, eval_interval=2)
  held = tmp_path / "held.jsonl"
  write_chats(str(held), 1, seed=1)
  with open(held, "a", encoding="utf-8") as f:
    f.write('{"messages": [{"role": "user", "content": "cut off\n')
  cfg.eval_datasets = [dataset("held", str(held))]
  job = run_nodes(write_recipe(cfg, str(tmp_path)), str(tmp_path))
  step = _assert_every_process_stopped(job, re.escape(f"{held}:2"), "DataError")
  assert step == 0
  # One process failed itself, the other stopped because of it; both name the failed one.
  own = ["every process stops" in e for e in job.stderr]
  assert sorted(own) == [False, True], job.stderr
  failed = own.index(True)
  assert f"process {failed} of 2 failed: DataError" in job.stderr[1 - failed]


def test_a_malformed_training_line_stops_both_naming_file_and_line(tmp_path):
  # Training data is read whole by every host (the order must not depend on the host count),
  # so both fail, at start-up, each naming the line.
  cfg = _config(tmp_path)
  train = cfg.data.datasets[0]["anno_path"]
  with open(train, "a", encoding="utf-8") as f:
    f.write("not json\n")
  job = run_nodes(write_recipe(cfg, str(tmp_path)), str(tmp_path))
  assert _assert_every_process_stopped(job, re.escape(f"{train}:97"), "DataError") == 0


def test_an_export_error_on_process_0_stops_both_naming_the_path(tmp_path, tmp_path_factory):
  use_compile_cache(tmp_path_factory)
  cfg = _config(tmp_path, hf_interval=2)
  job = run_nodes(write_recipe(cfg, str(tmp_path)), str(tmp_path),
                  fault=dict(kind="export", process=0))
  # Process 1 was waiting in the export's first gather: it must not hang there.
  step = _assert_every_process_stopped(
      job, "process 0 of 2 failed: HFExportError: HF export of step 2 to .*hf-2 failed",
      r"No space left on device: '.*hf-2\.partial/model-00001-of-00001\.safetensors'")
  assert step == 2
  assert "newest complete checkpoint is" in job.stderr[0] and "auto_resume=True" in job.stderr[0]


def test_a_failed_checkpoint_save_stops_both_naming_the_checkpoint(tmp_path, tmp_path_factory):
  use_compile_cache(tmp_path_factory)
  cfg = _config(tmp_path)
  job = run_nodes(write_recipe(cfg, str(tmp_path)), str(tmp_path),
                  fault=dict(kind="checkpoint", process=0, step=2))
  # Orbax's background write failed on process 0 only; process 1's waits at a barrier.
  _assert_every_process_stopped(
      job, r"process 0 of 2 failed: CheckpointError: checkpoint .*checkpoints/2 could not be "
           r"written \(process 0\): OSError: \[Errno 28\] No space left on device")
  run_dir = re.search(r"run directory: (\S+)", job.stderr[0]).group(1)
  assert not os.path.isdir(os.path.join(run_dir, "checkpoints", "2"))  # never looks complete


def test_an_error_in_the_prefetch_thread_stops_both(tmp_path, tmp_path_factory):
  use_compile_cache(tmp_path_factory)
  cfg = _config(tmp_path, checkpoint_interval=-1)
  job = run_nodes(write_recipe(cfg, str(tmp_path)), str(tmp_path),
                  fault=dict(kind="prefetch", process=1, step=3))
  step = _assert_every_process_stopped(
      job, "process 1 of 2 failed: PrefetchError: the data prefetch thread failed preparing "
           "the batch of step 3: RuntimeError: injected fault")
  assert step == 2


def test_a_configuration_error_exits_2_on_every_process(tmp_path):
  # 3 rows cannot be split over 2 data-parallel devices: every process refuses the recipe.
  cfg = _config(tmp_path, global_batch_size=3)
  job = run_nodes(write_recipe(cfg, str(tmp_path)), str(tmp_path))
  assert _assert_every_process_stopped(job, "configuration error: global_batch_size", code=2) == 0
  assert not os.path.exists(cfg.work_dir)  # nothing written
