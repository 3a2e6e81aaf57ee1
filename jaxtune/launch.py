"""How a jaxtune process joins a multi-host job, and the exit codes a scheduler acts on.

`python -m jaxtune.main` runs one process per host (all of that host's GPUs); with several
hosts every process calls `jax.distributed.initialize` before JAX starts its backends. Where
the settings come from, first match wins:

  1. flags `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`
     (or env JAXTUNE_COORDINATOR_ADDRESS / JAXTUNE_NUM_PROCESSES / JAXTUNE_PROCESS_ID);
  2. Open MPI (`mpirun`): OMPI_COMM_WORLD_SIZE / OMPI_COMM_WORLD_RANK; the coordinator is
     JAXTUNE_COORDINATOR_ADDRESS or, with Open MPI 4, mpirun's host (OMPI_MCA_orte_hnp_uri) at
     port JAXTUNE_COORDINATOR_PORT (default: JAX's, from the job id);
  3. SLURM (`srun`): SLURM_NTASKS / SLURM_PROCID; the coordinator is JAXTUNE_COORDINATOR_ADDRESS
     or the first host of SLURM_STEP_NODELIST at port JAXTUNE_COORDINATOR_PORT (default: JAX's,
     61440 + SLURM_JOB_ID % 4096);
  4. otherwise one process (no distributed runtime).
`--distributed=none|explicit|mpi|slurm` forces one source (`auto`, the default, tries them in
order). MPI comes before SLURM because `mpirun` inside an allocation sets both and only MPI's
rank is the process's. Nothing here imports JAX, so `--launch_dry_run` (print the resolution)
and configuration errors return at once.

Exit codes (`python -m jaxtune.main`; docs/training.md "Multi-host runs"):
  0   finished (also: nothing left to do);
  1   an error (data, export, checkpoint, non-finite, ...) here or on another host;
  2   a configuration or command-line error, nothing written;
  75  stopped by SIGTERM/SIGINT after writing a checkpoint: requeue with auto_resume
      (EX_TEMPFAIL from sysexits.h, "try again later");
  130 aborted by a second Ctrl-C.
With several hosts, every process exits with the code of the host that failed first.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping, Sequence

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_PREEMPTED = 75
EXIT_ABORTED = 130

MODES = ("auto", "explicit", "mpi", "slurm", "none")


class LaunchError(ValueError):
  """Distributed settings that cannot form a job (exit code 2)."""


def exit_code_for(exc: BaseException) -> int:
  """The exit code of a run that ended with `exc`."""
  from jaxtune.config import ConfigError  # pylint: disable=import-outside-toplevel
  if isinstance(exc, (ConfigError, LaunchError)):
    return EXIT_CONFIG
  if isinstance(exc, KeyboardInterrupt):
    return EXIT_ABORTED
  if isinstance(exc, SystemExit):
    return exc.code if isinstance(exc.code, int) else EXIT_ERROR
  return EXIT_ERROR


@dataclasses.dataclass(frozen=True)
class Distributed:
  """What `jax.distributed.initialize` gets; `num_processes == 1`: it is not called."""
  source: str                          # explicit | mpi | slurm | none
  num_processes: int = 1
  process_id: int = 0
  coordinator_address: str | None = None
  local_device_ids: tuple[int, ...] | None = None

  @property
  def multi_process(self) -> bool:
    return self.num_processes > 1

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def slurm_first_host(nodelist: str) -> str:
  """The first host of a SLURM node list: 'gpu-[003-005,9],login1' -> 'gpu-003'."""
  nodelist = nodelist.strip()
  match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
  if not match:
    raise LaunchError(f"cannot read the SLURM node list {nodelist!r}")
  prefix, ranges = match.groups()
  if ranges is None:
    return prefix
  first = ranges.split(",")[0].split("-")[0]  # zero padding kept: '003' stays '003'
  return prefix + first


def _int(value, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise LaunchError(f"{name} must be an integer, got {value!r}") from None


def _device_ids(value, name: str) -> tuple[int, ...] | None:
  if value is None or value == "" or value == []:
    return None
  items = value.split(",") if isinstance(value, str) else value
  try:
    return tuple(int(v) for v in items)
  except (TypeError, ValueError):
    raise LaunchError(f"{name} must be comma-separated device numbers, got {value!r}") from None


def _check_address(address: str, name: str) -> str:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise LaunchError(f"{name} must be HOST:PORT (process 0's host and a free port, e.g. "
                      f"node001:29500), got {address!r}")
  return address


def _local_ids(local_rank: int | None, local_size: int | None, env: Mapping[str, str]
               ) -> tuple[int, ...] | None:
  """One device per process when a host runs several processes and each still sees every GPU
  (JAX would otherwise give all of them to every process); None = every visible device."""
  if local_rank is None or not local_size or local_size <= 1:
    return None
  visible = env.get("CUDA_VISIBLE_DEVICES")
  if visible is not None and len([v for v in visible.split(",") if v.strip()]) <= 1:
    return None  # the scheduler bound one GPU to this task already
  return (local_rank,)


def resolve(mode: str = "auto", *, coordinator_address: str | None = None,
            num_processes: int | None = None, process_id: int | None = None,
            local_device_ids: Sequence[int] | str | None = None,
            env: Mapping[str, str] | None = None) -> Distributed:
  """The job this process belongs to, from the flags and the environment (see module doc)."""
  env = os.environ if env is None else env
  if mode not in MODES:
    raise LaunchError(f"--distributed must be one of {list(MODES)}, got {mode!r}")
  if mode == "none":
    return Distributed("none")
  local = (_device_ids(local_device_ids, "--local_device_ids")
           or _device_ids(env.get("JAXTUNE_LOCAL_DEVICE_IDS"), "JAXTUNE_LOCAL_DEVICE_IDS"))
  address = coordinator_address or env.get("JAXTUNE_COORDINATOR_ADDRESS") or None
  explicit = dict(
      coordinator_address=("--coordinator_address", "JAXTUNE_COORDINATOR_ADDRESS", address),
      num_processes=("--num_processes", "JAXTUNE_NUM_PROCESSES",
                     num_processes if num_processes is not None else
                     _int(env.get("JAXTUNE_NUM_PROCESSES"), "JAXTUNE_NUM_PROCESSES")),
      process_id=("--process_id", "JAXTUNE_PROCESS_ID",
                  process_id if process_id is not None else
                  _int(env.get("JAXTUNE_PROCESS_ID"), "JAXTUNE_PROCESS_ID")))
  given = {k: v[2] for k, v in explicit.items() if v[2] is not None}
  # A coordinator alone is how MPI and SLURM jobs name process 0's host: not "explicit".
  if mode == "explicit" or set(given) - {"coordinator_address"}:
    missing = [f"{flag} (or {var})" for flag, var, value in explicit.values() if value is None]
    if missing:
      raise LaunchError(f"an explicit multi-process job needs all of --coordinator_address, "
                        f"--num_processes and --process_id; missing: {', '.join(missing)}")
    return _checked(Distributed("explicit", given["num_processes"], given["process_id"],
                                _check_address(address, "--coordinator_address"), local))

  if mode in ("auto", "mpi") and env.get("OMPI_COMM_WORLD_SIZE"):
    size = _int(env["OMPI_COMM_WORLD_SIZE"], "OMPI_COMM_WORLD_SIZE")
    rank = _int(env.get("OMPI_COMM_WORLD_RANK"), "OMPI_COMM_WORLD_RANK")
    if rank is None:
      raise LaunchError("OMPI_COMM_WORLD_SIZE is set but OMPI_COMM_WORLD_RANK is not: start "
                        "jaxtune with mpirun (one rank per host)")
    if address is None and "OMPI_MCA_orte_hnp_uri" not in env and size > 1:
      raise LaunchError("Open MPI 5 (or another MPI) gives no coordinator address: pass "
                        "--coordinator_address=<host of rank 0>:<port>, e.g. "
                        "mpirun -x JAXTUNE_COORDINATOR_ADDRESS=$(hostname):29500 ...")
    if address is None and size > 1:
      address = _ompi4_coordinator(env)
    local = local or _local_ids(_int(env.get("OMPI_COMM_WORLD_LOCAL_RANK"), "local rank"),
                                _int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE"), "local size"), env)
    address = _check_address(address, "JAXTUNE_COORDINATOR_ADDRESS") if address else None
    return _checked(Distributed("mpi", size, rank, address, local))
  if mode == "mpi":
    raise LaunchError("--distributed=mpi but no Open MPI environment (OMPI_COMM_WORLD_SIZE): "
                      "start with mpirun, or use --distributed=auto")

  # SLURM_PROCID exists only inside a job step (srun), not in the batch script or salloc.
  if mode in ("auto", "slurm") and env.get("SLURM_PROCID") is not None and (
      env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")):
    size = _int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"), "SLURM_NTASKS")
    rank = _int(env["SLURM_PROCID"], "SLURM_PROCID")
    if address is None and size > 1:
      nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
      if not nodelist:
        raise LaunchError("SLURM_STEP_NODELIST is not set: set JAXTUNE_COORDINATOR_ADDRESS "
                          "to <first node>:<port>")
      port = _int(env.get("JAXTUNE_COORDINATOR_PORT"), "JAXTUNE_COORDINATOR_PORT")
      if port is None:  # JAX's own choice for SLURM, in the ephemeral range
        port = (_int(env.get("SLURM_JOB_ID"), "SLURM_JOB_ID") or 0) % 4096 + 61440
      address = f"{slurm_first_host(nodelist)}:{port}"
    per_node = _int((env.get("SLURM_NTASKS_PER_NODE") or "").split("(")[0].split(",")[0],
                    "SLURM_NTASKS_PER_NODE")
    local = local or _local_ids(_int(env.get("SLURM_LOCALID"), "SLURM_LOCALID"), per_node, env)
    address = _check_address(address, "JAXTUNE_COORDINATOR_ADDRESS") if address else None
    return _checked(Distributed("slurm", size, rank, address, local))
  if mode == "slurm":
    raise LaunchError("--distributed=slurm but this is not a SLURM job step (SLURM_PROCID "
                      "unset): start jaxtune with srun inside the job")
  return Distributed("none")


def _ompi4_coordinator(env: Mapping[str, str]) -> str:
  """mpirun's host and a port, from Open MPI 4's OMPI_MCA_orte_hnp_uri (as JAX reads it),
  e.g. '1531576320.0;tcp://10.96.0.1,10.148.0.1:34911' -> '10.96.0.1:<port>'."""
  uri = env["OMPI_MCA_orte_hnp_uri"]
  match = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
  if match is None:
    raise LaunchError(f"cannot read mpirun's address from OMPI_MCA_orte_hnp_uri={uri!r}: set "
                      "JAXTUNE_COORDINATOR_ADDRESS=<host of rank 0>:<port>")
  host = next(g for g in match.groups() if g is not None)
  port = _int(env.get("JAXTUNE_COORDINATOR_PORT"), "JAXTUNE_COORDINATOR_PORT")
  if port is None:  # JAX's choice: from the job id, in the ephemeral range
    job = _int(uri.split(".", 1)[0], "the Open MPI job id") or 0
    port = job // 4096 % 4096 + 61440
  return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _checked(spec: Distributed) -> Distributed:
  if spec.num_processes < 1 or not 0 <= spec.process_id < spec.num_processes:
    raise LaunchError(f"process id {spec.process_id} is not in [0, {spec.num_processes}) "
                      f"({spec.source} settings)")
  return spec


def initialize(spec: Distributed, *, timeout_s: int = 300, heartbeat_timeout_s: int = 100
               ) -> None:
  """Joins the job (a no-op for one process). Must run before JAX starts its backends."""
  if not spec.multi_process:
    return
  import jax  # pylint: disable=import-outside-toplevel
  kwargs = dict(coordinator_address=spec.coordinator_address,
                num_processes=spec.num_processes, process_id=spec.process_id,
                local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
                initialization_timeout=int(timeout_s),
                heartbeat_timeout_seconds=int(heartbeat_timeout_s))
  # Everything is decided here; JAX's own detection would also pin one GPU per SLURM/MPI task
  # (local_device_ids=[local rank]) even when the task is meant to drive the whole host.
  jax.distributed.initialize(cluster_detection_method="deactivate", **kwargs)
