"""scripts/bench_train.py and scripts/bench_torch_baseline.py on the CPU with a tiny Qwen3.

- the shared packed-batch generator is deterministic and well formed;
- the torch baseline's document masks (SDPA's boolean mask and flex attention's BlockMask)
  isolate the packed samples: the packed loss equals transformers' model run on each sample
  alone;
- both command lines print sane JSON, and on the same weights (jaxtune's export) and the same
  batch their first-step losses agree (fp32);
- the bf16 paths both run (smoke).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, SCRIPTS)

import bench_torch_baseline  # noqa: E402  pylint: disable=wrong-import-position
import bench_train  # noqa: E402  pylint: disable=wrong-import-position

TINY = ["--preset=qwen3_tiny", "--vocab=1024", "--pack=256", "--mean_len=64"]


@pytest.fixture
def one_torch_thread():
  """Two threads on a busy 2-core machine make torch's small matmuls ~40x slower."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


def _run(script: str, *args: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", OMP_NUM_THREADS="1",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *args], env=env,
                        capture_output=True, text=True, timeout=240, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _sane(result: dict, stack: str) -> None:
  assert result["stack"] == stack
  assert result["tokens"] == result["global_batch"] * result["pack"]  # rows are full
  assert result["tokens_per_sec_per_device"] > 0 and result["step_time_s"] > 0
  assert result["compile_s"] >= 0 and result["first_step_s"] > 0
  assert math.isfinite(result["loss"]) and math.isfinite(result["first_loss"])
  assert 0 < result["first_loss"] < 2 * math.log(result["vocab"])
  assert result["flops_per_step"] > 0 and result["mfu"] is None  # no known peak on a CPU
  assert result["host_mem_peak_gib"] > 0


def test_packed_rows_deterministic_and_well_formed():
  a = bench_train.packed_rows(4, 16384, 151936, seed=3)
  b = bench_train.packed_rows(4, 16384, 151936, seed=3)
  c = bench_train.packed_rows(4, 16384, 151936, seed=4)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["input_ids"], c["input_ids"])
  assert (a["segment_ids"] > 0).all()  # packed to the last token
  for r in range(4):
    seg, pos, ids, labels = (a[k][r] for k in ("segment_ids", "positions", "input_ids",
                                               "labels"))
    starts = np.flatnonzero(np.diff(seg, prepend=0))
    assert (pos[starts] == 0).all() and (np.diff(pos)[np.diff(seg) == 0] == 1).all()
    trained = np.flatnonzero(labels >= 0)
    assert (seg[trained] == seg[trained + 1]).all()  # never across a sample boundary
    np.testing.assert_array_equal(labels[trained], ids[trained + 1])
  stats = bench_train.batch_stats(a)
  assert 600 < stats["mean_sample_len"] < 2500 and stats["max_sample_len"] <= 16384
  assert 0.4 < stats["loss_tokens"] / a["labels"].size < 0.6
  lengths = bench_train.sample_lengths(np.random.default_rng(0), 20000, mean_len=1536,
                                       sigma=1.0, min_len=16, max_len=10**9)
  assert abs(lengths.mean() / 1536 - 1) < 0.05 and np.median(lengths) < 1536


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_torch_document_mask_isolates_samples(attention, one_torch_thread):
  from jaxtune.models import presets  # pylint: disable=import-outside-toplevel
  cfg = presets.qwen3_tiny(vocab_size=512)
  host = bench_train.packed_rows(2, 128, cfg.vocab_size, seed=1, mean_len=40)
  assert len(np.unique(host["segment_ids"][0])) >= 3
  model = bench_torch_baseline.build_model(cfg, device="cpu", precision="fp32",
                                           attention=attention, remat="none")
  with torch.no_grad():
    for param in model.parameters():  # larger weights: attention really mixes tokens
      param.normal_(0.0, 0.3)
  batch = bench_torch_baseline.to_device(host, "cpu")
  with torch.no_grad():
    packed = float(bench_torch_baseline.loss_sum(model, batch, attention=attention,
                                                 chunk=96)) / (host["labels"] >= 0).sum()
    bench_torch_baseline.set_attention(model, "sdpa")
    alone = bench_torch_baseline.isolated_loss(model, host)
    # The same rows under one causal mask over the whole row: samples see each other.
    causal = bench_torch_baseline.document_mask(torch.ones_like(batch["segment_ids"]), "sdpa")
    logits = model(input_ids=batch["input_ids"], position_ids=batch["positions"],
                   attention_mask={"full_attention": causal}, use_cache=False).logits
    leaky = float(torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1),
        ignore_index=-100))
  assert packed == pytest.approx(alone, rel=1e-5)
  assert abs(leaky - alone) > 1e-3  # the check can fail


@pytest.mark.slow
def test_scripts_agree_on_the_same_weights(tmp_path):
  hf_dir = str(tmp_path / "hf")
  common = TINY + ["--batch=2", "--steps=1", "--seed=5"]
  jax_result = _run("bench_train.py", *common, "--compute_dtype=float32",
                    f"--export_hf={hf_dir}", f"--json_out={tmp_path / 'out.jsonl'}")
  torch_result = _run("bench_torch_baseline.py", *common, "--warmup=1", "--precision=fp32",
                      f"--load_hf={hf_dir}", f"--json_out={tmp_path / 'out.jsonl'}")
  _sane(jax_result, "jaxtune")
  _sane(torch_result, "torch")
  for key in ("tokens", "samples", "loss_tokens", "flops_per_step", "params"):
    assert jax_result[key] == torch_result[key], key
  assert torch_result["first_loss"] == pytest.approx(jax_result["first_loss"], rel=1e-4)
  lines = (tmp_path / "out.jsonl").read_text().splitlines()
  assert [json.loads(line)["stack"] for line in lines] == ["jaxtune", "torch"]


@pytest.mark.slow
def test_bf16_paths_run(one_torch_thread):
  # In-process: conftest's 4 simulated devices, so the jaxtune step runs sharded (fsdp=4).
  jax_result = bench_train.main(TINY + ["--batch=4", "--steps=1", "--remat=full"])
  torch_result = bench_torch_baseline.main(TINY + ["--batch=2", "--micro=2", "--steps=1",
                                                    "--warmup=1", "--loss=hf"])
  _sane(jax_result, "jaxtune")
  _sane(torch_result, "torch")
  assert jax_result["compute_dtype"] == torch_result["compute_dtype"] == "bfloat16"
  assert jax_result["n_devices"] == 4 and torch_result["precision"] == "amp"
