"""Two processes forming one JAX job on the CPU (gloo collectives): what a multi-host run does.

- Under SLURM (scripts/launch_slurm.sh with stand-ins for srun and scontrol): a SIGTERM seen by
  one process only stops both after the same step, with one shared run directory and one
  checkpoint; both exit 75 and the script requeues the job; the requeued job (the same
  command) continues both to the end and exits 0.
- Two processes train exactly like one process with the same global batch and mesh, and a
  run moves between topologies: checkpointed by 1 process, resumed by 2, and the reverse, it
  sees exactly the remaining batches of the epoch.
"""

import json
import os
import re
import subprocess

import pytest

from jaxtune.config import dataset, to_json
from jaxtune.train.trainer import Trainer
from multihost_jobs import free_port, job_env, run_slurm, write_recipe
from test_trainer_utils import (EXACT_FIELDS, python, read_metrics, reference_run,
                                resumed_config, tiny_config, use_compile_cache, write_chats)

pytestmark = pytest.mark.slow


def _tails(job):
  return "\n".join(f"--- task {i}:\n{err[-3000:]}" for i, err in enumerate(job.stderr))


def test_slurm_sigterm_on_one_process_stops_both_exits_75_requeues_and_resumes(
    tmp_path, tmp_path_factory):
  use_compile_cache(tmp_path_factory)
  cfg = tiny_config(str(tmp_path), tensorboard=False, eval_interval=2)
  cfg.eval_datasets = [dataset("held", write_chats(str(tmp_path / "held.jsonl"), 6, seed=1))]
  args = write_recipe(cfg, str(tmp_path))
  job = run_slurm(args, str(tmp_path), fault=dict(kind="sigterm", process=1, step=2))
  tasks = job.tasks
  assert job.code == 75, _tails(tasks)  # preempted with a checkpoint: requeue
  assert job.scontrol == ["show hostnames localhost,localhost-2", "requeue 4242"]
  assert "--kill-on-bad-exit=0" in job.srun_options
  summary = tasks.summary(0)  # only process 0 prints it
  assert "\"run_dir\"" not in tasks.stdout[1]
  assert summary["steps"] == 2 and summary["stopped_by_signal"]
  run_dir = summary["run_dir"]
  assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["2"]
  assert "received SIGTERM" in tasks.stderr[1] and "received SIGTERM" not in tasks.stderr[0]
  assert "stopped by a signal on another process after step 2" in tasks.stderr[0]
  # Both processes computed the same eval loss over their shares of the eval set.
  evals = []
  for log in ("train.log", "train.1.log"):
    with open(os.path.join(run_dir, log), encoding="utf-8") as f:
      evals.append(re.search(r"eval after step 2: held (\S+)", f.read()).group(1))
  assert evals[0] == evals[1]

  job = run_slurm(args, str(tmp_path))  # the requeued job: the same script and arguments
  assert job.code == 0, _tails(job.tasks)
  assert job.scontrol == ["show hostnames localhost,localhost-2"]  # finished: no requeue
  summary = job.tasks.summary(0)
  assert (summary["run_dir"], summary["steps"], summary["steps_this_session"]) == (run_dir, 6, 4)
  assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 7))


# Two Trainer.fit() calls in one two-process job, joined through jaxtune.launch like the CLI.
_DRIVER = """
import json, sys
from ml_collections import ConfigDict
from jaxtune import launch
launch.initialize(launch.resolve("explicit", coordinator_address=sys.argv[1], num_processes=2,
                                 process_id=int(sys.argv[2])))
from jaxtune.train.trainer import Trainer
for path in sys.argv[3:]:
  with open(path) as f:
    print("SUMMARY " + json.dumps(Trainer(ConfigDict(json.load(f))).fit()), flush=True)
"""


def _same(records, reference):
  """Equal step for step: data fields exactly, loss and gradient norm to float rounding (the
  reductions cross processes through gloo instead of in one process)."""
  assert [{k: r[k] for k in EXACT_FIELDS if k not in ("loss", "grad_norm")} for r in records] \
      == [{k: r[k] for k in EXACT_FIELDS if k not in ("loss", "grad_norm")} for r in reference]
  for r, ref in zip(records, reference):
    assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6), (r["step"], r, ref)
    assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6), (r["step"], r, ref)


def test_two_processes_train_like_one_and_resume_across_topologies(tmp_path, tmp_path_factory):
  # The reference: one process with 4 devices (mesh fsdp=4), 6 of the epoch's 12 steps,
  # checkpoints at 4 and 6. The job: 2 processes x 2 devices, the same mesh and global batch.
  ref_cfg, ref_summary = reference_run(tmp_path_factory)
  reference = read_metrics(ref_summary["run_dir"])
  fresh = resumed_config(ref_cfg, str(tmp_path / "fresh"), checkpoint_maxkeep=-1)
  one_to_two = resumed_config(ref_cfg, str(tmp_path / "one-to-two"), resume_from=os.path.join(
      ref_summary["run_dir"], "checkpoints", "4"))
  paths = []
  for name, cfg in (("fresh", fresh), ("one-to-two", one_to_two)):
    paths.append(str(tmp_path / f"{name}.json"))
    with open(paths[-1], "w", encoding="utf-8") as f:
      f.write(to_json(cfg))
  env = job_env(str(tmp_path), devices_per_process=2)
  address = f"localhost:{free_port()}"
  procs = [subprocess.Popen([python(), "-c", _DRIVER, address, str(i), *paths], cwd=tmp_path,
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
  summaries = [json.loads(line[8:]) for line in outs[0][0].splitlines()
               if line.startswith("SUMMARY ")]
  assert [s["steps"] for s in summaries] == [6, 6]

  # Two processes = one process, from the first step.
  two = read_metrics(summaries[0]["run_dir"])
  _same(two, reference)
  # 1 -> 2: checkpointed by one process at step 4, resumed by two: steps 5 and 6 as before.
  assert summaries[1]["steps_this_session"] == 2
  _same(read_metrics(summaries[1]["run_dir"]), reference[4:])
  # 2 -> 1: the two-process run's checkpoint 4, resumed here by one process.
  back = Trainer(resumed_config(ref_cfg, str(tmp_path / "two-to-one"), resume_from=os.path.join(
      summaries[0]["run_dir"], "checkpoints", "4"))).fit()
  assert back["steps_this_session"] == 2
  _same(read_metrics(back["run_dir"]), reference[4:])
  # Every step of the epoch seen exactly once in each: the same tokens, in the same order.
  assert back["consumed_tokens"] == ref_summary["consumed_tokens"] == summaries[0]["consumed_tokens"]
