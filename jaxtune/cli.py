"""The `jaxtune` command: one entry point for the training, planning, data and plot tools.

    jaxtune train --config=RECIPE [--config.x=v ...]   = python -m jaxtune.main
    jaxtune plan --config=RECIPE [--devices=N] ...     = python -m jaxtune.plan
    jaxtune data --config=RECIPE [--show_row=K] ...    = python -m jaxtune.data
    jaxtune plot RUN_DIR                               writes RUN_DIR/curves.png

Each subcommand hands the rest of the command line to that module's own entry, unchanged, so
its flags, output and exit codes are the module's. `jaxtune SUBCOMMAND --help` lists its flags.
"""

from __future__ import annotations

import runpy
import sys

# name -> one-line description, in the order --help lists them.
COMMANDS = {
    "train": "train a recipe: --config=RECIPE [--config.x=v ...] (python -m jaxtune.main)",
    "plan": "a recipe's per-device memory, compiled without allocating (python -m jaxtune.plan)",
    "data": "a recipe's data statistics and packed rows, no accelerator (python -m jaxtune.data)",
    "plot": "RUN_DIR: draw loss, eval losses, lr and tokens/s to RUN_DIR/curves.png",
}

EXIT_USAGE = 2


def usage() -> str:
  width = max(len(name) for name in COMMANDS)
  lines = ["usage: jaxtune SUBCOMMAND [FLAGS ...]", "", "subcommands:"]
  lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
  lines += ["", "`jaxtune SUBCOMMAND --help` lists a subcommand's flags."]
  return "\n".join(lines)


def _run_module(name: str, argv: list[str]) -> None:
  """Runs `python -m name` in this process: the module reads its flags from sys.argv (jaxtune.main
  loads --config when it is imported) and registers them as the main module's, so --help,
  output and exit codes are the module's own."""
  sys.argv = argv
  runpy.run_module(name, run_name="__main__", alter_sys=True)  # as `python -m name` does


def _train(argv: list[str]) -> None:
  _run_module("jaxtune.main", argv)


def _plan(argv: list[str]) -> None:
  _run_module("jaxtune.plan", argv)


def _data(argv: list[str]) -> None:
  _run_module("jaxtune.data", argv)


def _plot(argv: list[str]) -> None:
  args = argv[1:]
  if args and args[0] in ("-h", "--help", "-help"):
    print("usage: jaxtune plot RUN_DIR\n\nDraws loss, eval_loss_<name>, lr and tokens/s "
          "against step from RUN_DIR/metrics.jsonl into RUN_DIR/curves.png "
          "(needs matplotlib: pip install 'jaxtune[plot]').")
    sys.exit(0)
  if len(args) != 1:
    print("jaxtune plot: expected one argument, RUN_DIR (a run directory with metrics.jsonl)",
          file=sys.stderr)
    sys.exit(EXIT_USAGE)
  from jaxtune import plot  # pylint: disable=import-outside-toplevel
  try:
    path = plot.plot_run(args[0])
  except plot.PlotError as e:
    print(f"jaxtune plot: {e}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
  print(path)


_RUNNERS = {"train": _train, "plan": _plan, "data": _data, "plot": _plot}


def main(argv: list[str] | None = None) -> None:
  """The `jaxtune` script; `argv` defaults to sys.argv. Exits with the subcommand's code."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2:  # nothing to do: the list, as a usage error
    print(usage(), file=sys.stderr)
    sys.exit(EXIT_USAGE)
  if argv[1] in ("-h", "--help", "-help", "help"):
    print(usage())
    sys.exit(0)
  command = argv[1]
  runner = _RUNNERS.get(command)
  if runner is None:
    print(f"jaxtune: unknown subcommand {command!r}\n\n{usage()}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
  runner([f"jaxtune {command}"] + argv[2:])  # (train/plan/data: argv[0] becomes the module's)


if __name__ == "__main__":
  main()
