"""Weights & Biases logging (observability.wandb_*), offline: the run's transaction log holds
every metrics.jsonl record with the same values, the recipe as its config, and a resumed run
continues the same W&B run."""

import glob
import json
import os
import struct

import pytest

from jaxtune import config as config_lib
from jaxtune.train import wandb_log
from jaxtune.train.trainer import Trainer
from test_trainer_utils import read_metrics, tiny_config, use_compile_cache

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # pylint: disable=wrong-import-position


def read_wandb_records(path: str) -> list:
  """The records of a `.wandb` transaction log (W&B's LevelDB-style log: a 7-byte header, then
  32 KiB blocks of chunks, each `crc32 u32, length u16, type u8` + data; type 1 = a whole
  record, 2/3/4 = its first/middle/last part; a block's tail under 7 bytes is padding)."""
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B", data[:7]
  block, pos, pending, out = 32768, 7, b"", []
  while pos + 7 <= len(data):
    if block - pos % block < 7:
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack_from("<IHB", data, pos)
    pos += 7
    if kind == 0:  # zero fill
      continue
    pending += data[pos:pos + length]
    pos += length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      out.append(record)
      pending = b""
  return out


def read_offline_runs(run_dir: str) -> tuple[set, list[dict], dict]:
  """(run ids, history rows in order, config) of every offline W&B session in run_dir."""
  ids, rows, config = set(), [], {}
  paths = sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))
  for path in paths:
    for record in read_wandb_records(path):
      kind = record.WhichOneof("record_type")
      if kind == "run":
        ids.add(record.run.run_id)
        updates = record.run.config.update
      elif kind == "config":
        updates = record.config.update
      elif kind == "history":
        rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item})
        continue
      else:
        continue
      config.update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                     for u in updates})
  return ids, rows, config


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
  """No network, nothing outside tmp_path: offline mode, W&B's own dirs under tmp_path."""
  for key, value in dict(WANDB_MODE="offline", WANDB_SILENT="true",
                         WANDB_DIR=str(tmp_path / "wandb-dir"),
                         WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
                         WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
                         WANDB_DATA_DIR=str(tmp_path / "wandb-data")).items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _recipe(root, **overrides):
  settings = dict(total_steps=3, checkpoint_interval=-1, tensorboard=False)
  cfg = tiny_config(str(root), **{**settings, **overrides})
  cfg.observability.wandb_project = "jaxtune-test"
  cfg.observability.wandb_run_name = "tiny"
  cfg.observability.wandb_tags = ("test", "tiny")
  cfg.observability.wandb_mode = "offline"
  return cfg


@pytest.mark.slow
def test_wandb_logs_the_metrics_records_and_resumes_the_same_run(tmp_path, tmp_path_factory,
                                                                 capfd):
  use_compile_cache(tmp_path_factory)
  first = Trainer(_recipe(tmp_path)).fit()
  run_dir = first["run_dir"]
  with open(os.path.join(run_dir, wandb_log.ID_FILE), encoding="utf-8") as f:
    run_id = f.read().strip()
  assert run_id

  # auto_resume: the same run directory, one more step, the same W&B run.
  second = Trainer(_recipe(tmp_path, total_steps=4, auto_resume=True)).fit()
  assert second["run_dir"] == run_dir and second["resumed_from"]
  with open(os.path.join(run_dir, wandb_log.ID_FILE), encoding="utf-8") as f:
    assert f.read().strip() == run_id

  ids, rows, config = read_offline_runs(run_dir)
  assert ids == {run_id}
  assert len(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))) == 2  # two sessions
  records = read_metrics(run_dir)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert [row["_step"] for row in rows] == [1, 2, 3, 4]
  for record, row in zip(records, rows):
    for key in ("loss", "lr", "grad_norm", "tokens", "step"):
      assert row[key] == record[key], (key, row, record)
    logged = {k: v for k, v in row.items() if not k.startswith("_")}
    assert logged == {k: v for k, v in record.items() if v is not None}

  assert config["optim"]["lr"] == pytest.approx(3e-3)
  assert config["total_steps"] == 4  # the resumed session's recipe updated it
  assert config["model"]["hidden_size"] == 32
  out, err = capfd.readouterr()
  assert "wandb:" not in out + err  # silent: no W&B banner or sync hints on the console


def test_wandb_off_by_default(tmp_path, tmp_path_factory):
  use_compile_cache(tmp_path_factory)
  cfg = tiny_config(str(tmp_path), total_steps=1, checkpoint_interval=-1, tensorboard=False)
  assert cfg.observability.wandb_project is None
  run_dir = Trainer(cfg).fit()["run_dir"]
  assert not os.path.exists(os.path.join(run_dir, wandb_log.ID_FILE))
  assert not os.path.exists(os.path.join(run_dir, "wandb"))


def test_wandb_keys_are_validated(tmp_path, monkeypatch):
  cfg = _recipe(tmp_path)
  cfg.observability.wandb_mode = "sometimes"
  with pytest.raises(config_lib.ConfigError, match="observability.wandb_mode"):
    config_lib.validate(cfg)
  cfg = _recipe(tmp_path)
  real_find_spec = config_lib.importlib.util.find_spec
  monkeypatch.setattr(config_lib.importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
  with pytest.raises(config_lib.ConfigError, match=r"pip install jaxtune\[wandb\]"):
    config_lib.validate(cfg)
