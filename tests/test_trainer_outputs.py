"""What a run leaves behind: contract-4 metrics, TensorBoard events, the profiler trace, the
config snapshot, checkpoint and HF export pruning with hf-latest, the log and the summary."""

import glob
import json
import os
import struct

import numpy as np
import pytest

from test_trainer_utils import CONTRACT_FIELDS, read_metrics, reference_run


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  return reference_run(tmp_path_factory)


def _tfrecords(path):
  """The payloads of a TFRecord file, each checked against its masked CRC32-C."""
  from tensorboardX.crc32c import crc32c  # pylint: disable=import-outside-toplevel

  def masked(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

  with open(path, "rb") as f:
    blob = f.read()
  pos = 0
  while pos < len(blob):
    header = blob[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", blob[pos + 8:pos + 12])
    payload = blob[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", blob[pos + 12 + length:pos + 16 + length])
    assert masked(header) == header_crc and masked(payload) == payload_crc
    yield payload
    pos += 16 + length


def test_metrics_keep_contract_fields_and_add_timing_and_memory(reference):
  cfg, summary = reference
  records = read_metrics(summary["run_dir"])
  assert [r["step"] for r in records] == list(range(1, cfg.total_steps + 1))
  for r in records:
    for field in CONTRACT_FIELDS:
      if field == "mfu":  # no known peak FLOP/s on a CPU: null, not a made-up number
        assert r[field] is None
        continue
      assert isinstance(r[field], (int, float)) and np.isfinite(r[field]), (field, r)
    assert r["tokens_per_sec"] == pytest.approx(r["tokens"] / r["step_time"])
    assert r["data_time"] >= 0 and r["host_mem_peak_gib"] > 0 and r["skipped"] is False
  assert records[-1]["consumed_tokens"] == sum(r["tokens"] for r in records)


def test_tensorboard_events_are_readable_and_match_metrics(reference):
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  _, summary = reference
  files = glob.glob(os.path.join(summary["run_dir"], "tensorboard", "events.out.tfevents.*"))
  assert len(files) == 1
  scalars = {}
  for payload in _tfrecords(files[0]):
    event = event_pb2.Event.FromString(payload)
    for value in event.summary.value:
      scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  records = read_metrics(summary["run_dir"])
  assert "train/mfu" not in scalars    # null on a CPU: not plotted
  for field in ("loss", "grad_norm", "lr", "tokens_per_sec_per_device", "data_time"):
    assert scalars[f"train/{field}"] == pytest.approx(
        {r["step"]: r[field] for r in records}, rel=1e-6), field


def test_profiler_trace_covers_the_chosen_steps(reference):
  _, summary = reference
  traces = glob.glob(os.path.join(summary["run_dir"], "profile", "plugins", "profile", "*",
                                  "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  with open(os.path.join(summary["run_dir"], "train.log"), encoding="utf-8") as f:
    assert "profiler trace of steps 3-4" in f.read()


def test_run_dir_snapshot_has_config_versions_and_command(reference):
  cfg, summary = reference
  with open(os.path.join(summary["run_dir"], "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["total_steps"] == cfg.total_steps and saved["model"] == cfg.model.to_dict()
  assert saved["data"]["datasets"][0]["anno_path"] == cfg.data.datasets[0]["anno_path"]
  with open(os.path.join(summary["run_dir"], "run_info.json"), encoding="utf-8") as f:
    info = json.load(f)
  import jax  # pylint: disable=import-outside-toplevel
  import jaxtune  # pylint: disable=import-outside-toplevel
  assert info["jaxtune_version"] == jaxtune.__version__ and info["jax_version"] == jax.__version__
  assert "git_revision" in info and info["command"] and len(info["devices"]) == 4


def test_checkpoints_and_exports_are_pruned_and_latest_points_at_the_newest(reference):
  _, summary = reference
  run_dir = summary["run_dir"]
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["4", "6"]  # maxkeep 2
  exports = sorted(d for d in os.listdir(run_dir) if d.startswith("hf-"))
  assert exports == ["hf-4", "hf-6", "hf-latest"]                               # hf_max_keep 2
  assert os.readlink(os.path.join(run_dir, "hf-latest")) == "hf-6"
  with open(os.path.join(run_dir, "hf-latest", "model.safetensors.index.json")) as f:
    assert "model.embed_tokens.weight" in json.load(f)["weight_map"]
  assert summary["hf_export"] == os.path.join(run_dir, "hf-6")
  assert summary["checkpoint"] == os.path.join(run_dir, "checkpoints", "6")


def test_summary_and_log_report_the_run(reference):
  cfg, summary = reference
  records = read_metrics(summary["run_dir"])
  assert summary["steps"] == summary["total_steps"] == cfg.total_steps
  assert summary["tokens_this_session"] == summary["consumed_tokens"] == sum(
      r["tokens"] for r in records)
  assert summary["train_time_s"] == pytest.approx(sum(r["step_time"] for r in records), abs=2e-3)
  assert summary["mean_mfu"] is None                   # a CPU has no known peak FLOP/s
  assert summary["tokens_per_sec_per_device"] > 0 and summary["skipped_steps"] == 0
  assert not summary["stopped_by_signal"]
  with open(os.path.join(summary["run_dir"], "train.log"), encoding="utf-8") as f:
    text = f.read()
  assert f"step {cfg.total_steps}/{cfg.total_steps}" in text and "done: 6/6 steps" in text
  assert "HF export: " + summary["hf_export"] in text


def test_mfu_is_model_flops_over_the_devices_peak_and_null_without_one():
  from jaxtune.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  assert metrics_lib.peak_flops_per_device() is None          # the CPU
  assert metrics_lib.mfu(4e12, 2.0, 1e12, 4) == pytest.approx(0.5)
  assert metrics_lib.mfu(4e12, 2.0, None, 4) is None
