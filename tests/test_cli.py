"""The `jaxtune` command (jaxtune.cli): subcommand list, dispatch, `plot`, a quiet start.

Run as `python -m jaxtune.cli ...` so the tests do not depend on the script being installed.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from jaxtune import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env(**extra):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)   # conftest's 4 simulated devices: one device in the children
  env.pop("PYTHONPATH", None)
  env.update(extra)
  return env


def _jaxtune(*args, cwd=ROOT, env=None, timeout=300):
  return subprocess.run([sys.executable, "-m", "jaxtune.cli", *args], cwd=cwd,
                        env=env or _env(), capture_output=True, text=True, timeout=timeout,
                        check=False)


def test_help_lists_subcommands():
  r = _jaxtune("--help")
  assert r.returncode == 0, r.stderr
  listed = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("  ")]
  assert listed == ["train", "plan", "data", "plot"]
  for name in cli.COMMANDS:  # one line each, with a description
    assert re.search(rf"^  {name}\s+\S", r.stdout, re.M)


def test_no_arguments_prints_the_list_and_exits_2():
  r = _jaxtune()
  assert r.returncode == 2
  assert "train" in r.stderr and "plot" in r.stderr


def test_unknown_subcommand_exits_2_with_the_list():
  r = _jaxtune("trian", "--config=configs/sft_qwen3_mini.py")
  assert r.returncode == 2
  assert "unknown subcommand 'trian'" in r.stderr
  for name in cli.COMMANDS:
    assert re.search(rf"^  {name}\s", r.stderr, re.M)


def test_main_in_process_unknown_and_help(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["jaxtune", "nope"])
  assert e.value.code == 2
  with pytest.raises(SystemExit) as e:
    cli.main(["jaxtune", "-h"])
  assert e.value.code == 0
  assert "plot" in capsys.readouterr().out


def test_data_prints_stats():
  r = _jaxtune("data", "--config=configs/sft_qwen3_mini.py")
  assert r.returncode == 0, r.stderr
  assert "mini_chats" in r.stdout
  assert re.search(r"optimizer steps per epoch", r.stdout)
  assert re.search(r"packs, efficiency \d", r.stdout)


@pytest.mark.slow
def test_data_json_matches_the_module():
  args = ["--config=configs/sft_qwen3_mini.py", "--json"]
  via_cli = _jaxtune("data", *args)
  via_module = subprocess.run([sys.executable, "-m", "jaxtune.data", *args], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=300,
                              check=False)
  assert via_cli.returncode == via_module.returncode == 0, via_cli.stderr
  stats, expected = json.loads(via_cli.stdout), json.loads(via_module.stdout)
  stats.pop("startup_seconds", None)  # timings
  expected.pop("startup_seconds", None)
  assert stats == expected


@pytest.mark.slow
def test_subcommand_flag_errors_keep_their_exit_code():
  r = _jaxtune("data", "--config=configs/sft_qwen3_mini.py", "--no_such_flag=1")
  assert r.returncode != 0
  r = _jaxtune("train", "--config=configs/sft_qwen3_mini.py", "--config.no_such_key=1")
  assert r.returncode == 2
  assert "unknown config key" in r.stderr
  r = _jaxtune("plan", "--config=configs/sft_qwen3_mini.py", "stray")
  assert r.returncode == 2
  assert "unexpected arguments" in r.stderr


@pytest.mark.parametrize("command,module", [("train", "jaxtune.main"), ("plan", "jaxtune.plan"),
                                            ("data", "jaxtune.data")])
def test_subcommand_help_is_the_modules(command, module):
  via_cli = _jaxtune(command, "--help")
  via_module = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=300, check=False)
  assert via_cli.returncode == via_module.returncode
  assert via_cli.stdout == via_module.stdout and "--config" in via_cli.stdout


def _write_metrics(run_dir):
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
    for step in range(1, 6):
      record = {"step": step, "epoch": 1, "loss": 3.0 / step, "lr": 1e-3 * step / 5,
                "tokens_per_sec": 1000.0 + 10 * step}
      if step % 2 == 1:
        record["eval_loss_val"] = 3.2 / step
      f.write(json.dumps(record) + "\n")


def test_plot_writes_a_png(tmp_path):
  pytest.importorskip("matplotlib")
  run_dir = tmp_path / "run"
  _write_metrics(run_dir)
  r = _jaxtune("plot", str(run_dir))
  assert r.returncode == 0, r.stderr
  out = run_dir / "curves.png"
  assert r.stdout.strip() == str(out)
  data = out.read_bytes()
  assert data[:8] == PNG_MAGIC
  assert len(data) > 20_000, len(data)  # three panels of curves, not an empty canvas


def test_plot_run_function(tmp_path):
  pytest.importorskip("matplotlib")
  from jaxtune import plot  # pylint: disable=import-outside-toplevel
  _write_metrics(tmp_path)
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 6, "loss": 0.4')  # a torn last line (a killed run) is skipped
  assert len(plot.read_metrics(str(tmp_path / "metrics.jsonl"))) == 5
  path = plot.plot_run(str(tmp_path))
  assert path == str(tmp_path / "curves.png")
  assert open(path, "rb").read(8) == PNG_MAGIC


def test_plot_without_metrics_exits_2(tmp_path):
  r = _jaxtune("plot", str(tmp_path))
  assert r.returncode == 2
  assert "no metrics.jsonl" in r.stderr
  assert not (tmp_path / "curves.png").exists()
  r = _jaxtune("plot")
  assert r.returncode == 2


def test_plot_without_matplotlib_exits_2(tmp_path):
  _write_metrics(tmp_path)
  # A child in which `import matplotlib` fails, as in an install without the plot extra.
  code = ("import sys; sys.modules['matplotlib'] = None; from jaxtune import cli; "
          f"cli.main(['jaxtune', 'plot', {str(tmp_path)!r}])")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                     text=True, timeout=120, check=False)
  assert r.returncode == 2
  assert "pip install 'jaxtune[plot]'" in r.stderr


_PROBING = re.compile(r"Unable to initialize backend|Platform '\w+' is experimental|"
                      r"An NVIDIA GPU may be present|backend '\w+' failed", re.I)


@pytest.mark.slow
@pytest.mark.parametrize("entry", [["-m", "jaxtune.cli", "train"], ["-m", "jaxtune.main"]],
                         ids=["jaxtune-train", "python-m-jaxtune.main"])
def test_quiet_start(tmp_path, entry):
  """No JAX backend probing on the console: the first line is jaxtune's own."""
  env = _env()
  env.pop("JAX_PLATFORMS", None)  # let JAX probe its backends, as on a user's machine
  cmd = [sys.executable, *entry, "--config=configs/sft_qwen3_mini.py",
         "--config.total_steps=1", "--config.epoch_num=0", "--config.progress_bar=False",
         f"--config.work_dir={tmp_path / 'runs'}"]
  r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stdout
  lines = [line for line in r.stdout.splitlines() if line.strip()]
  assert re.match(r"\d\d:\d\d:\d\d INFO run directory: ", lines[0]), lines[:5]
  assert not _PROBING.search(r.stdout), r.stdout
