"""Command line: `python -m jaxtune.main --config=configs/<recipe>.py[:arg] [--config.a.b=v]`.

Without --config it runs the embedded default recipe (jaxtune/recipes/sft_mini.py: a miniature
Intern-S1 on bundled text + image data), which finishes in a few minutes on a laptop CPU.

One process per host. With several hosts each process joins the job first (flags
--coordinator_address/--num_processes/--process_id, or SLURM / Open MPI; see jaxtune.launch and
docs/training.md "Multi-host runs"). Exit codes: 0 finished, 75 stopped by a signal with a
checkpoint written (requeue), 2 configuration or command-line error, 1 any other error (on any
host), 130 aborted by a second Ctrl-C.

A fatal error is written with its full traceback to the run's train.log; the console shows a
short report (what, where, what to do, where the traceback is), the traceback itself only with
--verbose or JAXTUNE_VERBOSE=1. A new run directory that failed before writing a checkpoint is
renamed `<name>-failed` (jaxtune.train.startup_checks).
"""

import json
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from jaxtune import launch

_DEFAULT_RECIPE = os.path.join(os.path.dirname(__file__), "recipes", "sft_mini.py")


def _command_line_error(e: BaseException, argv: list[str]):
  """A bad flag, override or recipe: a configuration error, exit code 2, nothing started."""
  overrides = [a for a in argv[1:] if a.startswith("--config")]
  if isinstance(e, (AttributeError, KeyError)):  # how ml_collections reports an unknown key
    what = f"unknown config key {str(e).strip(chr(34))}"
  else:
    what = f"{type(e).__name__}: {e}"
  print(f"jaxtune: command-line error: {what}\n"
        f"  (in {' '.join(overrides) or 'the default recipe'}: check the recipe file and that "
        "every --config.<key>=<value> names a key of jaxtune/config.py with a value of its "
        "type; --helpfull lists the flags)", file=sys.stderr)
  sys.exit(launch.EXIT_CONFIG)


try:  # ml_collections loads the recipe and its overrides from sys.argv here, at definition
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT_RECIPE, "Recipe file defining get_config(arg=None).", lock_config=True)
except Exception as _e:  # pylint: disable=broad-except
  _command_line_error(_e, sys.argv)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", launch.MODES,
    "Where the multi-host settings come from: auto (flags, else Open MPI, else SLURM, else one "
    "process), explicit (the three flags below), mpi, slurm, or none.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT of process 0 (env JAXTUNE_COORDINATOR_ADDRESS); every process passes the same.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the job, one per host (env JAXTUNE_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 to num_processes-1 (env JAXTUNE_PROCESS_ID).")
_LOCAL_DEVICES = flags.DEFINE_string(
    "local_device_ids", None,
    "Comma-separated local GPU numbers this process uses (default: all visible); only for "
    "several processes per host (env JAXTUNE_LOCAL_DEVICE_IDS).")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for every process to join the job.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 100,
    "Seconds without a heartbeat after which JAX declares a host dead (SIGKILL, out of memory) "
    "and stops every process.")
_DRY_RUN = flags.DEFINE_bool(
    "launch_dry_run", False,
    "Print the multi-host settings this process would use (JSON) and exit, starting nothing.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False,
    "On a fatal error, print its traceback on the console too (it is always in the run's "
    "train.log); env JAXTUNE_VERBOSE=1 does the same.")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, but a bad flag or recipe is a configuration error: exit code 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (flags.Error, the recipe's own errors)
    _command_line_error(e, argv)


def main(argv) -> None:
  if len(argv) > 1:
    print(f"jaxtune: unexpected arguments {argv[1:]}: every setting is a --flag",
          file=sys.stderr)
    sys.exit(launch.EXIT_CONFIG)
  try:
    spec = launch.resolve(_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                          num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                          local_device_ids=_LOCAL_DEVICES.value)
  except launch.LaunchError as e:
    print(f"jaxtune: multi-host settings: {e}", file=sys.stderr)
    sys.exit(launch.EXIT_CONFIG)
  try:
    config = _CONFIG.value
    config.to_dict()  # a recipe that failed to load is a stand-in that raises when read
  except Exception as e:  # pylint: disable=broad-except
    _command_line_error(e, sys.argv)
  if _DRY_RUN.value:
    print(json.dumps(dict(spec.as_dict(), initialize=spec.multi_process), sort_keys=True))
    return
  from jaxtune.train import logs  # pylint: disable=import-outside-toplevel
  logs.quiet_libraries()  # before JAX starts its backends ("Unable to initialize backend")
  launch.initialize(spec, timeout_s=_INIT_TIMEOUT.value, heartbeat_timeout_s=_HEARTBEAT.value)

  # Imported here so that --help and config errors come back before JAX starts.
  import jax  # pylint: disable=import-outside-toplevel
  from jaxtune.config import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxtune.train import multihost  # pylint: disable=import-outside-toplevel
  from jaxtune.train.trainer import Trainer  # pylint: disable=import-outside-toplevel
  multihost.watch()
  trainer = None
  try:
    trainer = Trainer(config)
    summary = trainer.fit()  # several processes: an error ends every process in there
  except KeyboardInterrupt:
    print("jaxtune: aborted (second Ctrl-C); the newest complete checkpoint is intact",
          file=sys.stderr)
    sys.exit(launch.EXIT_ABORTED)
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() > 1:  # (an error in fit() has ended every process in there)
      if isinstance(e, ConfigError):
        print(logs.error_report(e), file=sys.stderr)
      multihost.fail(e)  # every process stops with this error's code; does not return
    _report_fatal(e, trainer)
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=2))
  # A scheduler requeues on 75: the checkpoint of the last step is complete.
  sys.exit(launch.EXIT_PREEMPTED if summary.get("stopped_by_signal") else launch.EXIT_OK)


def _report_fatal(e: Exception, trainer) -> None:
  """The short report on the console (the traceback is in train.log, and here with
  --verbose), then the exit code of `e` (2 for a configuration error, else 1)."""
  from jaxtune.train import logs  # pylint: disable=import-outside-toplevel
  verbose = _VERBOSE.value or logs.verbose_from_env()
  run_dir = getattr(trainer, "run_dir", None)
  log_file = os.path.join(run_dir, "train.log") if run_dir else None
  if log_file is not None and not os.path.isfile(log_file):
    log_file = None
  if verbose:
    traceback.print_exception(e, file=sys.stderr)
  print(logs.error_report(e, log_file=log_file, verbose=verbose), file=sys.stderr, flush=True)
  sys.exit(launch.exit_code_for(e))


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
