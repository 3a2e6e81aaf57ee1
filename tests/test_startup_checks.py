"""Start-up checks against the model (issue 23, item 2): token ids past the model's vocabulary
stop the start with exit code 2 naming both numbers, the tokenizer and the checkpoint; a run in
which every update was skipped is not a success; the non-finite stop names the causes it can
tell apart."""

import glob
import logging
import os
import subprocess
import types

import numpy as np
import pytest
from ml_collections import ConfigDict

from jaxtune import launch
from jaxtune.config import ConfigError
from jaxtune.data.encoding import TRAINED_BIT
from jaxtune.data.intern_s1_tokenizer import OFFSETS
from jaxtune.data.encoders import open_encoder
from jaxtune.models import presets
from jaxtune.train import startup_checks
from jaxtune.train.nonfinite import NonFiniteError, NonFiniteGuard
from jaxtune.data.encoding import max_id_in
from jaxtune.train.startup_checks import (FAILED_SUFFIX, Vocabulary, check_data,
                                          check_tokenizer, model_vocab_size)
from test_trainer_utils import (REPO, python, subprocess_env, tiny_config, use_compile_cache,
                                write_byte_tokenizer)

QWEN3_MAX_ID = 151668   # </think>: the largest id of Qwen3's published tokenizer


# ---- the ids a tokenizer can produce ---------------------------------------------------------

def test_tokenizer_max_id_counts_bpe_and_added_tokens_with_either_backend(tmp_path):
  path = write_byte_tokenizer(str(tmp_path / "tok"))
  fast, hf = open_encoder(path), open_encoder(path, allow_tiktoken=False)
  assert (fast.backend, hf.backend) == ("tiktoken", "hf")
  assert fast.max_id == hf.max_id == 258   # 256 bytes + 3 specials


@pytest.mark.slow
def test_official_intern_s1_tokenizer_fits_its_vocabulary(tmp_path):
  from interns1_layout import IMAGE_TOKEN, VOCAB_SIZE, write_tokenizer
  encoder = open_encoder(write_tokenizer(str(tmp_path / "interns1")))
  ranges = [OFFSETS[d] + m.get_piece_size() - 1 for d, m in encoder._sp.items()]
  assert encoder.max_id == max(ranges + [IMAGE_TOKEN]) < VOCAB_SIZE
  cfg = ConfigDict({"model": presets.intern_s1_tiny(), "tokenizer_path": encoder.path})
  cfg.model.text.vocab_size = VOCAB_SIZE
  assert check_tokenizer(cfg, encoder).key == "model.text.vocab_size"
  cfg.model.text.vocab_size = IMAGE_TOKEN
  with pytest.raises(ConfigError, match=f"is {IMAGE_TOKEN}, .* model.text.vocab_size"):
    check_tokenizer(cfg, encoder)


def test_model_vocab_size_reads_a_wrapped_language_model():
  assert model_vocab_size(presets.qwen3_tiny(vocab_size=77)) == (77, "model.vocab_size")
  wrapped = presets.intern_s1_tiny()
  assert model_vocab_size(wrapped) == (wrapped.text.vocab_size, "model.text.vocab_size")


# ---- the ids in the data ----------------------------------------------------------------------

def test_max_id_in_reads_only_the_samples_ranges_and_masks_the_trained_flag():
  rng = np.random.default_rng(0)
  tokens = np.full(300_000, 4_000_000_000, np.uint32)       # outside every range: never read
  spans = [(10, 5), (12, 8), (20, 3), (100, 0), (1000, 120_000), (200_000, 7), (250_000, 1)]
  expected = 0
  for start, length in spans:
    ids = rng.integers(0, 5000, length).astype(np.uint32)
    tokens[start:start + length] = ids | np.uint32(TRAINED_BIT)     # every token trained
    expected = max([expected, *ids.tolist()])
  tokens[250_000] = 9999                                           # a short range's own max
  starts, lengths = zip(*spans)
  assert max_id_in(tokens, starts, lengths) == max(expected, 9999)
  assert max_id_in(tokens, [], []) == -1 and max_id_in(tokens, [5], [0]) == -1


def _data_with(ids):
  """A stand-in for SFTData: one packed sample of `ids`."""
  tokens = np.asarray(ids, np.uint32)
  return types.SimpleNamespace(max_token_id=lambda: max_id_in(tokens, [0], [len(tokens)]))


def test_data_ids_past_the_vocabulary_are_a_configuration_error(tmp_path):
  cfg = tiny_config(str(tmp_path))               # byte tokenizer (max 258), vocabulary 320
  encoder = open_encoder(cfg.tokenizer_path)
  found = check_data(cfg, check_tokenizer(cfg, encoder), _data_with([1, 258, 7]))
  assert found == Vocabulary(320, "model.vocab_size", 258, 258)
  with pytest.raises(ConfigError) as err:        # ids a sample_transform made, say
    check_data(cfg, check_tokenizer(cfg, encoder), _data_with([1, 400 | TRAINED_BIT]))
  msg = str(err.value)
  assert "training data is 400" in msg and "model.vocab_size=320" in msg, msg
  assert cfg.tokenizer_path in msg and "load_from" in msg and "largest id is 258" in msg, msg


# ---- the command line: a cut vocabulary ---------------------------------------------------------

@pytest.mark.slow
def test_a_cut_vocabulary_exits_2_before_training_naming_both_numbers_and_paths(tmp_path):
  """Qwen3's tokenizer with a 1000-id model: every step would be NaN. Exit code 2 at start-up,
  naming 151668 and 1000, the tokenizer and the checkpoint; nothing trained or saved."""
  from jaxtune.recipes.qwen3_mini import default_tokenizer_dir
  work = tmp_path / "work"
  proc = subprocess.run(
      [python(), "-m", "jaxtune.main", f"--config={REPO}/configs/sft_qwen3_mini.py",
       f"--config.work_dir={work}", "--config.model.vocab_size=1000", "--config.total_steps=2",
       "--config.epoch_num=0", "--config.progress_bar=False"],
      capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env())
  assert proc.returncode == 2, proc.stderr[-3000:]
  console = proc.stdout + proc.stderr
  assert "Traceback" not in console, console[-3000:]
  for text in (str(QWEN3_MAX_ID), "model.vocab_size=1000", default_tokenizer_dir(),
               "load_from is unset"):
    assert text in proc.stderr, (text, proc.stderr[-3000:])
  (run_dir,) = glob.glob(str(work / "*"))
  assert run_dir.endswith(FAILED_SUFFIX)                      # a failed start, marked
  assert not glob.glob(os.path.join(run_dir, "metrics.jsonl"))   # before any step
  assert not glob.glob(os.path.join(run_dir, "checkpoints", "*"))
  with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
    log = f.read()
  assert "Traceback" in log and f"is {QWEN3_MAX_ID}" in log, log[-3000:]


# ---- runs in which no update was applied --------------------------------------------------------

def _record(step, skipped=True, loss=float("nan"), lr=1e-3, nonfinite=None):
  return dict(step=step, skipped=skipped, loss=loss, grad_norm=float("nan") if skipped else 1.0,
              lr=lr, nonfinite=skipped if nonfinite is None else nonfinite)


def test_guard_stops_a_run_whose_every_update_was_skipped():
  vocab = Vocabulary(320, "model.vocab_size", 258, 200)
  guard = NonFiniteGuard(10, total_steps=3, vocabulary=vocab)
  guard.check(_record(1))
  guard.check(_record(2))
  with pytest.raises(NonFiniteError) as err:
    guard.check(_record(3))
  msg = str(err.value)
  assert "no update was applied in this run: every one of its 3 step(s) was skipped" in msg
  assert "3 with a non-finite loss" in msg and "step 3" in msg, msg
  assert "token ids: not the cause (largest id 200 in the data, 258 in the tokenizer; " \
         "model.vocab_size = 320)" in msg, msg
  assert "the learning rate: not the cause" in msg and "steps 1, 2, 3 " in msg, msg
  assert launch.exit_code_for(err.value) == launch.EXIT_ERROR


def test_guard_lets_a_run_with_updates_or_a_resumed_session_finish(caplog):
  guard = NonFiniteGuard(10, total_steps=3)
  for step, skipped in ((1, True), (2, False), (3, True)):
    guard.check(_record(step, skipped, loss=2.0 if not skipped else float("nan")))
  resumed = NonFiniteGuard(10, total_steps=6)      # earlier sessions may have trained
  with caplog.at_level(logging.WARNING, "jaxtune"):
    for step in (5, 6):
      resumed.check(_record(step))
  assert "no update was applied in this session" in caplog.text


def test_nonfinite_stop_after_updates_names_the_learning_rate():
  guard = NonFiniteGuard(2, total_steps=100)
  guard.check(_record(1, skipped=False, loss=3.25, lr=0.5))
  guard.check(_record(2))
  with pytest.raises(NonFiniteError, match="2 steps in a row .* non-finite") as err:
    guard.check(_record(3))
  msg = str(err.value)
  assert "updates were applied until step 1 (loss 3.25, lr 0.5)" in msg and "optim.lr" in msg
  assert "steps 2, 3 " in msg and "token ids" not in msg, msg   # no id check was recorded


@pytest.mark.slow
def test_all_skipped_run_exits_nonzero_naming_it(tmp_path, tmp_path_factory):
  """Every batch meets a NaN embedding row: all 3 steps are skipped (fewer than
  max_consecutive_nonfinite). The run exits 1 naming that, with no checkpoint and no export."""
  from test_trainer_nonfinite import _config_with_nan_row
  use_compile_cache(tmp_path_factory)
  root = str(tmp_path / "run")
  cfg = _config_with_nan_row(root, marked=tuple(range(96)))
  recipe = tmp_path / "recipe.py"
  recipe.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
      "from test_trainer_utils import tiny_config\n"
      "from jaxtune.config import dataset\n"
      "def get_config(arg=None):\n"
      f"  c = tiny_config({root!r}, total_steps=3, checkpoint_interval=-1, hf_interval=-1,\n"
      "                  max_consecutive_nonfinite=10)\n"
      f"  c.data.datasets = [dataset('chats', {cfg.data.datasets[0]['anno_path']!r})]\n"
      f"  c.load_from = {cfg.load_from!r}\n"
      "  return c\n")
  proc = subprocess.run([python(), "-m", "jaxtune.main", f"--config={recipe}"],
                        capture_output=True, text=True, timeout=300, cwd=tmp_path,
                        env=subprocess_env())
  assert proc.returncode == launch.EXIT_ERROR, proc.stderr[-3000:]
  assert "no update was applied in this run" in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  (run_dir,) = glob.glob(os.path.join(cfg.work_dir, "*"))
  assert run_dir.endswith(FAILED_SUFFIX)
  assert not glob.glob(os.path.join(run_dir, "hf-*"))
  assert not glob.glob(os.path.join(run_dir, "checkpoints", "[0-9]*"))


# ---- a failed start's directory ----------------------------------------------------------------

def test_only_a_new_run_without_checkpoints_is_set_aside(tmp_path):
  fresh = tmp_path / "20260101-000000"
  (fresh / "checkpoints").mkdir(parents=True)
  (fresh / "train.log").write_text("error\n")
  assert startup_checks.set_aside_failed_start(str(fresh)) == str(fresh) + FAILED_SUFFIX
  again = tmp_path / "20260101-000000"
  again.mkdir()
  assert startup_checks.set_aside_failed_start(str(again)) == f"{again}{FAILED_SUFFIX}-1"
  kept = []
  for name, make in (("with-checkpoint", lambda d: (d / "checkpoints" / "4").mkdir(parents=True)),
                     ("with-export", lambda d: (d / "hf-2").mkdir()),
                     ("resumed", lambda d: (d / "run_info.json").write_text(
                         '{"previous_starts": [{"started": "x"}]}'))):
    d = tmp_path / name
    d.mkdir()
    make(d)
    kept.append(startup_checks.set_aside_failed_start(str(d)) == str(d) and d.is_dir())
  assert kept == [True, True, True]
  assert startup_checks.set_aside_failed_start(None) is None
