"""Running jaxtune as a real multi-process job on one machine, for the multi-host tests.

Each process is `python -m jaxtune.main` started by scripts/launch_nodes.sh (or by
scripts/launch_slurm.sh through a stand-in `srun`), one simulated CPU "host" per process,
gloo collectives between them. A fault can be planted in one process (tests/multihost_faults).
Every job runs under a deadline: a process still running then is killed and reported as hung.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from typing import NamedTuple

from jaxtune.config import to_json
from test_trainer_utils import REPO, python, subprocess_env

FAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_faults")
LAUNCH_NODES = os.path.join(REPO, "scripts", "launch_nodes.sh")
LAUNCH_SLURM = os.path.join(REPO, "scripts", "launch_slurm.sh")

_RECIPE = """
import json
from ml_collections import ConfigDict

def get_config(arg=None):
  with open(arg, encoding="utf-8") as f:
    return ConfigDict(json.load(f))
"""


class Job(NamedTuple):
  codes: list[int]            # exit code of each process (None: killed after the deadline)
  ended: list[float]          # when each process exited (time.time())
  stdout: list[str]
  stderr: list[str]
  started: float
  fault_fired: float | None   # when the planted fault fired (or a failure was first announced)

  def stop_steps(self) -> list[int | None]:
    """The step each process reported stopping after (failures)."""
    found = [re.search(r"stops after step (\d+)", err) for err in self.stderr]
    return [int(m.group(1)) if m else None for m in found]

  def summary(self, i: int = 0) -> dict:
    out = self.stdout[i]
    return json.loads(out[out.index("{"):])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def write_recipe(cfg, directory: str, name: str = "recipe") -> list[str]:
  """The jaxtune.main flags that run `cfg` (the recipe file reads it back from JSON)."""
  os.makedirs(directory, exist_ok=True)
  recipe, values = os.path.join(directory, "recipe.py"), os.path.join(directory, f"{name}.json")
  with open(recipe, "w", encoding="utf-8") as f:
    f.write(_RECIPE)
  with open(values, "w", encoding="utf-8") as f:
    f.write(to_json(cfg))
  return [f"--config={recipe}:{values}"]


# JAX's persistent compilation cache is not shared with multi-process jobs: with jax 0.12.1,
# two CPU processes that load their train step from it hang in its first gloo collectives
# (both wait forever, step 1 never ends); compiling afresh they do not (docs/testing.md).
_CACHE_KEYS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def job_env(directory: str, *, devices_per_process: int = 1, fault: dict | None = None) -> dict:
  env = {k: v for k, v in subprocess_env().items() if k not in _CACHE_KEYS}
  env.update(
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
      PYTHON=python(), JAXTUNE_TEST_FAULT=json.dumps(fault) if fault else "",
      JAXTUNE_TEST_FAULT_FIRED=os.path.join(directory, "fault-fired.txt"),
      PYTHONPATH=os.pathsep.join([FAULTS, env["PYTHONPATH"]]))
  return env


def wait_all(procs, logs, *, deadline_s: float, started: float, directory: str) -> Job:
  """Waits for every process (killing those still running at the deadline)."""
  ended = [None] * len(procs)
  while time.time() < started + deadline_s and any(e is None for e in ended):
    for i, p in enumerate(procs):
      if ended[i] is None and p.poll() is not None:
        ended[i] = time.time()
    time.sleep(0.05)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  outs = []
  for out, err in logs:
    out.close()
    err.close()
    with open(out.name, encoding="utf-8") as f_out, open(err.name, encoding="utf-8") as f_err:
      outs.append((f_out.read(), f_err.read()))
  fired_path = os.path.join(directory, "fault-fired.txt")
  fired = None  # the first fault or failure announcement
  if os.path.exists(fired_path):
    with open(fired_path, encoding="utf-8") as f:
      times = [float(line.split()[0]) for line in f if line.strip()]
    fired = min(times) if times else None
  return Job([p.returncode if e is not None else None for p, e in zip(procs, ended)], ended,
             [o for o, _ in outs], [e for _, e in outs], started, fired)


def run_nodes(args: list[str], directory: str, *, processes: int = 2,
              devices_per_process: int = 1, fault: dict | None = None,
              deadline_s: float = 240) -> Job:
  """One job of `processes` processes started by scripts/launch_nodes.sh."""
  env = job_env(directory, devices_per_process=devices_per_process, fault=fault)
  env.update(NNODES=str(processes), MASTER_ADDR="localhost", MASTER_PORT=str(free_port()))
  procs, logs = [], []
  started = time.time()
  for i in range(processes):
    out = open(os.path.join(directory, f"stdout.{i}.txt"), "w", encoding="utf-8")
    err = open(os.path.join(directory, f"stderr.{i}.txt"), "w", encoding="utf-8")
    logs.append((out, err))
    procs.append(subprocess.Popen(["bash", LAUNCH_NODES, *args], cwd=directory,
                                  env={**env, "NODE_RANK": str(i)}, stdout=out, stderr=err))
  return wait_all(procs, logs, deadline_s=deadline_s, started=started, directory=directory)


_FAKE_SRUN = r"""#!/usr/bin/env bash
# Stand-in for srun on one machine: srun's options are logged, then the task command runs once
# per task, here, with the variables srun gives a task; the exit code is the highest one.
tasks=${FAKE_SRUN_TASKS:-2}
while [[ $1 == -* ]]; do echo "$1" >> "$FAKE_SLURM_DIR/srun-options.txt"; shift; done
pids=()
for ((i = 0; i < tasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i SLURM_NTASKS=$tasks \
  SLURM_STEP_NUM_TASKS=$tasks SLURM_NTASKS_PER_NODE=1 SLURM_STEP_NODELIST=localhost \
    "$@" > "$FAKE_SLURM_DIR/stdout.$i.txt" 2> "$FAKE_SLURM_DIR/stderr.$i.txt" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid"; code=$?; (( code > rc )) && rc=$code; done
exit $rc
"""

_FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_SLURM_DIR/scontrol.txt"
if [[ $1 == show && $2 == hostnames ]]; then echo localhost; echo localhost-2; fi
"""


class SlurmJob(NamedTuple):
  code: int | None            # the batch script's exit code (None: killed at the deadline)
  tasks: Job                  # what each task did (exit codes are not separated by srun)
  scontrol: list[str]         # the scontrol commands the script ran
  srun_options: list[str]


def run_slurm(args: list[str], directory: str, *, tasks: int = 2, job_id: int = 4242,
              devices_per_process: int = 1, fault: dict | None = None,
              deadline_s: float = 240) -> SlurmJob:
  """scripts/launch_slurm.sh run as sbatch would, with stand-ins for srun and scontrol."""
  bin_dir = os.path.join(directory, "fake-slurm-bin")
  os.makedirs(bin_dir, exist_ok=True)
  for name, text in (("srun", _FAKE_SRUN), ("scontrol", _FAKE_SCONTROL)):
    with open(os.path.join(bin_dir, name), "w", encoding="utf-8") as f:
      f.write(text)
    os.chmod(os.path.join(bin_dir, name), 0o755)
  for name in ("scontrol.txt", "srun-options.txt", "fault-fired.txt"):
    if os.path.exists(os.path.join(directory, name)):
      os.remove(os.path.join(directory, name))
  env = job_env(directory, devices_per_process=devices_per_process, fault=fault)
  env.update(PATH=os.pathsep.join([bin_dir, env["PATH"]]), FAKE_SLURM_DIR=directory,
             FAKE_SRUN_TASKS=str(tasks), SLURM_JOB_ID=str(job_id),
             SLURM_JOB_NODELIST="localhost,localhost-2",
             JAXTUNE_COORDINATOR_PORT=str(free_port()))
  started = time.time()
  proc = subprocess.Popen(["bash", LAUNCH_SLURM, *args], cwd=directory, env=env,
                          start_new_session=True)
  try:
    code = proc.wait(timeout=deadline_s)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, 9)  # the script, the stand-in srun and every task
    proc.wait()
    code = None
  ended = time.time()
  outs = []
  for i in range(tasks):
    texts = []
    for stream in ("stdout", "stderr"):
      path = os.path.join(directory, f"{stream}.{i}.txt")
      with open(path, encoding="utf-8") if os.path.exists(path) else open(os.devnull) as f:
        texts.append(f.read())
    outs.append(texts)

  def lines(name):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      return []
    with open(path, encoding="utf-8") as f:
      return f.read().splitlines()
  fired = [float(line.split()[0]) for line in lines("fault-fired.txt") if line.strip()]
  tasks_job = Job([code] * tasks, [ended] * tasks, [o for o, _ in outs], [e for _, e in outs],
                  started, min(fired) if fired else None)
  return SlurmJob(code, tasks_job, lines("scontrol.txt"), lines("srun-options.txt"))
