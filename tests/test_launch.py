"""How a process joins a multi-host job (jaxtune.launch), the CLI's exit codes for bad launch
settings, and the launch scripts' argument assembly, all without a scheduler: the scripts run
with JAXTUNE_DRY_RUN=1 (and a stand-in scontrol), and what they assemble goes through
`python -m jaxtune.main --launch_dry_run`, which prints the settings jax.distributed would get.
(The scripts also start real two-process jobs: tests/test_trainer_multihost.py,
tests/test_multihost_failures.py.)"""

import json
import os
import subprocess

import pytest

from jaxtune import launch
from jaxtune.config import ConfigError
from multihost_jobs import LAUNCH_NODES, LAUNCH_SLURM
from test_trainer_utils import REPO, python

_SLURM_TASK = dict(SLURM_JOB_ID="1234", SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_LOCALID="0",
                   SLURM_NTASKS_PER_NODE="1", SLURM_STEP_NODELIST="gpu-[007-010]")


def test_one_process_without_settings():
  spec = launch.resolve(env={})
  assert (spec.source, spec.num_processes, spec.multi_process) == ("none", 1, False)
  # Inside a SLURM batch script or salloc (no job step: no SLURM_PROCID), still one process.
  assert launch.resolve(env=dict(SLURM_JOB_ID="1", SLURM_NTASKS="16")).source == "none"


def test_explicit_flags_and_their_environment_variables():
  spec = launch.resolve(coordinator_address="node0:29500", num_processes=2, process_id=1, env={})
  assert spec == launch.Distributed("explicit", 2, 1, "node0:29500")
  env = dict(JAXTUNE_COORDINATOR_ADDRESS="node0:1", JAXTUNE_NUM_PROCESSES="4",
             JAXTUNE_PROCESS_ID="2", JAXTUNE_LOCAL_DEVICE_IDS="0,1")
  assert launch.resolve(env=env) == launch.Distributed("explicit", 4, 2, "node0:1", (0, 1))
  assert launch.resolve(process_id=3, env=env).process_id == 3  # a flag beats the variable
  # Explicit settings win over a scheduler's (e.g. a hand-made job inside an allocation).
  assert launch.resolve(env={**env, **_SLURM_TASK}).source == "explicit"


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2, process_id=0), "missing: --coordinator_address"),
    (dict(coordinator_address="h:1", num_processes=2), "missing: --process_id"),
    (dict(coordinator_address="node0", num_processes=2, process_id=0), "must be HOST:PORT"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "not in [0, 2)"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=0, local_device_ids="a"),
     "comma-separated"),
])
def test_explicit_settings_that_cannot_form_a_job_say_what_to_fix(kwargs, message):
  with pytest.raises(launch.LaunchError, match=message.replace("[", r"\[").replace(")", r"\)")):
    launch.resolve(env={}, **kwargs)


@pytest.mark.parametrize("nodelist, first", [
    ("node001", "node001"), ("node001,node002", "node001"), ("gpu-[007-010]", "gpu-007"),
    ("gpu-[3,5-9],login1", "gpu-3"), ("a[0001-0002]", "a0001")])
def test_slurm_first_host(nodelist, first):
  assert launch.slurm_first_host(nodelist) == first


def test_slurm_job_step():
  spec = launch.resolve(env=_SLURM_TASK)
  # JAX's own port choice for SLURM: 61440 + job id % 4096.
  assert spec == launch.Distributed("slurm", 4, 3, f"gpu-007:{61440 + 1234}")
  env = {**_SLURM_TASK, "JAXTUNE_COORDINATOR_PORT": "29500"}
  assert launch.resolve(env=env).coordinator_address == "gpu-007:29500"
  env = {**_SLURM_TASK, "JAXTUNE_COORDINATOR_ADDRESS": "10.0.0.1:7000"}
  assert launch.resolve(env=env).coordinator_address == "10.0.0.1:7000"
  assert not launch.resolve(env={**_SLURM_TASK, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).multi_process
  assert launch.resolve("none", env=_SLURM_TASK).source == "none"
  with pytest.raises(launch.LaunchError, match="not a SLURM job step"):
    launch.resolve("slurm", env={})


def test_several_tasks_per_node_get_one_gpu_each_unless_slurm_bound_them():
  env = {**_SLURM_TASK, "SLURM_NTASKS_PER_NODE": "8", "SLURM_LOCALID": "5"}
  assert launch.resolve(env=env).local_device_ids == (5,)
  assert launch.resolve(env={**env, "CUDA_VISIBLE_DEVICES": "5"}).local_device_ids is None
  assert launch.resolve(env=_SLURM_TASK).local_device_ids is None  # one task drives the node


def test_open_mpi():
  env = dict(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_LOCAL_RANK="0",
             OMPI_COMM_WORLD_LOCAL_SIZE="1",
             OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1,10.148.0.1:34911")
  spec = launch.resolve(env=env)
  assert spec == launch.Distributed("mpi", 2, 1, f"10.96.0.1:{1531576320 // 4096 % 4096 + 61440}")
  # mpirun inside a SLURM allocation sets both: MPI's rank is the process's.
  assert launch.resolve(env={**env, **_SLURM_TASK}).source == "mpi"
  del env["OMPI_MCA_orte_hnp_uri"]  # Open MPI 5: no address to derive
  with pytest.raises(launch.LaunchError, match="JAXTUNE_COORDINATOR_ADDRESS"):
    launch.resolve(env=env)
  env["JAXTUNE_COORDINATOR_ADDRESS"] = "rank0host:29500"
  assert launch.resolve(env=env).coordinator_address == "rank0host:29500"


def test_exit_codes():
  assert launch.exit_code_for(ConfigError("x")) == launch.EXIT_CONFIG == 2
  assert launch.exit_code_for(launch.LaunchError("x")) == 2
  assert launch.exit_code_for(RuntimeError("x")) == launch.EXIT_ERROR == 1
  assert launch.exit_code_for(KeyboardInterrupt()) == launch.EXIT_ABORTED == 130
  assert launch.EXIT_PREEMPTED == 75 and launch.EXIT_OK == 0


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "JAXTUNE_", "NNODES", "NODE_RANK", "MASTER_"))}
  env.update(PYTHON=python(), PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **extra)
  return env


def _run(cmd, env, **kwargs):
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, **kwargs)


def _resolved(cmd, env):
  """Runs an assembled jaxtune.main command with --launch_dry_run: the settings it would use."""
  out = _run([*cmd, "--launch_dry_run"], env)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args, message", [
    (["--config.no_such_key=1"], "unknown config key 'no_such_key'"),
    (["--config.global_batch_size=lots"], "global_batch_size"),
    (["--num_processes=2", "--process_id=0"], "missing: --coordinator_address"),
    (["--distributed=slurm"], "not a SLURM job step"),
])
def test_bad_launch_or_config_flags_exit_2_before_anything_starts(args, message, tmp_path):
  out = _run([python(), "-m", "jaxtune.main", *args, "--launch_dry_run"], _env(), cwd=tmp_path)
  assert out.returncode == 2 and message in out.stderr, out.stderr
  assert not os.listdir(tmp_path)  # nothing written


def test_launch_nodes_assembles_the_explicit_flags(tmp_path):
  env = _env(NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", MASTER_PORT="29511",
             JAXTUNE_DRY_RUN="1")
  out = _run(["bash", LAUNCH_NODES, "--config=configs/sft_mini.py"], env)
  assert out.returncode == 0, out.stderr
  cmd = out.stdout.splitlines()
  assert cmd == [python(), "-m", "jaxtune.main", "--coordinator_address=node0:29511",
                 "--num_processes=2", "--process_id=1", "--config=configs/sft_mini.py"]
  del env["JAXTUNE_DRY_RUN"]
  assert _resolved(cmd, {**env, "PYTHONPATH": REPO}) == dict(
      source="explicit", num_processes=2, process_id=1, coordinator_address="node0:29511",
      local_device_ids=None, initialize=True)
  # One node: a plain single-process run.
  out = _run(["bash", LAUNCH_NODES, "--config.seed=1"], _env(JAXTUNE_DRY_RUN="1"))
  assert out.stdout.splitlines() == [python(), "-m", "jaxtune.main", "--config.seed=1"]


@pytest.mark.parametrize("env, message", [
    (dict(NNODES="2", NODE_RANK="2", MASTER_ADDR="h"), "NODE_RANK must be 0..1"),
    (dict(NNODES="2", NODE_RANK="0"), "set MASTER_ADDR"),
    (dict(NNODES="two"), "NNODES must be a positive number"),
])
def test_launch_nodes_refuses_settings_that_cannot_form_a_job(env, message):
  out = _run(["bash", LAUNCH_NODES], _env(JAXTUNE_DRY_RUN="1", **env))
  assert out.returncode == 2 and message in out.stderr, out.stderr


def test_launch_slurm_assembles_srun_and_each_task_finds_the_coordinator(tmp_path):
  with open(LAUNCH_SLURM, encoding="utf-8") as f:
    header = [line for line in f if line.startswith("#SBATCH")]
  for option in ("--ntasks-per-node=1", "--signal=TERM@", "--requeue"):
    assert any(option in line for line in header), option
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n'
                                    '[[ "$1 $2" == "show hostnames" ]] && printf "gpu-007\\ngpu-008\\n"\n')
  (bin_dir / "scontrol").chmod(0o755)
  env = _env(SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="gpu-[007-008]", JAXTUNE_DRY_RUN="1",
             PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  out = _run(["bash", LAUNCH_SLURM, "--config=configs/sft_mini.py"], env)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  address = f"gpu-007:{61440 + 1234}"
  assert lines[0] == f"JAXTUNE_COORDINATOR_ADDRESS={address}"
  srun = lines[1:]
  task = srun[srun.index(python()):]
  assert srun[:srun.index(python())] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=0"]
  assert task == [python(), "-m", "jaxtune.main", "--distributed=slurm",
                  "--config=configs/sft_mini.py", "--config.auto_resume=True"]
  # What srun's task 1 of 2 would resolve (srun sets these variables; the script exported the
  # coordinator).
  task_env = {**_env(), "JAXTUNE_COORDINATOR_ADDRESS": address, "SLURM_JOB_ID": "1234",
              "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
              "SLURM_NTASKS_PER_NODE": "1", "SLURM_STEP_NODELIST": "gpu-[007-008]"}
  assert _resolved(task, task_env) == dict(
      source="slurm", num_processes=2, process_id=1, coordinator_address=address,
      local_device_ids=None, initialize=True)
  # Outside a job it says how to use it.
  out = _run(["bash", LAUNCH_SLURM], _env())
  assert out.returncode != 0 and "submit it with sbatch" in out.stderr
