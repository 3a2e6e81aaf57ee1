"""jaxtune's Qwen3 against transformers' PyTorch Qwen3ForCausalLM (float32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxtune.models import export_hf, load_hf_weights
from jaxtune.models import abstract_model, presets
from jaxtune.parallel import batch_sharding, make_mesh

pytestmark = pytest.mark.parity

VOCAB = 128

# (tied, q heads, kv heads, head_dim): GQA ratio 1 and 4; head_dim != hidden / heads (48 / N).
CASES = {
    "tied_mha": (True, 4, 4, 16),
    "untied_gqa4": (False, 8, 2, 8),
}


def _fields(tied: bool, num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
  return dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
              head_dim=head_dim, max_position_embeddings=256, rope_theta=10_000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=tied)


def _torch_model(fields: dict, seed: int) -> torch.nn.Module:
  """A random HF model with O(1) activations: norms and all weights perturbed, so q_norm,
  k_norm and every projection matter for the logits."""
  torch.manual_seed(seed)
  hf_cfg = transformers.Qwen3Config(**fields, attn_implementation="eager")
  model = transformers.Qwen3ForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn_like(param)
      param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)
  return model


def _single_device_mesh():
  return make_mesh({}, devices=jax.devices()[:1])


def _load(cfg, hf_dir, mesh, compute_dtype="float32"):
  model = abstract_model(cfg, mesh, compute_dtype=compute_dtype, remat="none")
  return load_hf_weights(model, hf_dir)


_PREPARED: dict[str, tuple] = {}


def _prepare(case: str, tmp_path_factory) -> tuple:
  """(jaxtune model cfg, torch model, HF dir, jaxtune model loaded on 1 device), built once."""
  if case not in _PREPARED:
    fields = _fields(*CASES[case])
    torch_model = _torch_model(fields, seed=len(case))
    hf_dir = tmp_path_factory.mktemp(case) / "hf"
    torch_model.save_pretrained(hf_dir)
    cfg = presets.qwen3_tiny(**fields)
    _PREPARED[case] = (cfg, torch_model, str(hf_dir),
                       _load(cfg, str(hf_dir), _single_device_mesh()))
  return _PREPARED[case]


@pytest.fixture(params=sorted(CASES))
def reference(request, tmp_path_factory):
  return _prepare(request.param, tmp_path_factory)


@pytest.fixture
def tied_reference(tmp_path_factory):
  return _prepare("tied_mha", tmp_path_factory)


@nnx.jit
def _logits(model, ids, positions, segment_ids):
  return model.logits(model(ids, positions, segment_ids))


def _torch_logits(torch_model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return torch_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _row(length: int, rows: int = 2, seed: int = 0):
  ids = np.random.RandomState(seed).randint(0, VOCAB, (rows, length)).astype(np.int32)
  positions = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
  return ids, positions, np.ones_like(ids)


def test_logits_match_transformers(reference):
  _, torch_model, _, model = reference
  ids, positions, segments = _row(24)
  ours = np.asarray(_logits(model, ids, positions, segments))
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, _torch_logits(torch_model, ids), atol=1e-4, rtol=0)


def test_token_chunked_mlp_gives_the_same_logits_and_gradients(reference):
  """The MLP run in token chunks (what remat='full' does on rows over MLP_TOKEN_CHUNK tokens),
  here 3 chunks of 8: logits as transformers', gradients as the unchunked model's."""
  _, torch_model, _, model = reference
  graphdef, state = nnx.split(model)
  chunked = nnx.merge(graphdef, state)
  chunked.model.layers.mlp.token_chunk = 8
  ids, positions, segments = _row(24)
  ours = np.asarray(_logits(chunked, ids, positions, segments))
  np.testing.assert_allclose(ours, _torch_logits(torch_model, ids), atol=1e-4, rtol=0)

  @nnx.jit
  def grads(m):
    return nnx.grad(lambda m: jnp.sum(_logits(m, ids, positions, segments) ** 2) / 1e3)(m)

  for got, want in zip(jax.tree.leaves(nnx.state(grads(chunked))),
                       jax.tree.leaves(nnx.state(grads(model)))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_export_reloads_in_transformers_with_identical_logits(reference, tmp_path):
  cfg, torch_model, _, model = reference
  out_dir = export_hf(model, cfg, str(tmp_path / "export"), dtype="float32")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir,
                                                               attn_implementation="eager")
  assert type(reloaded).__name__ == "Qwen3ForCausalLM"
  assert reloaded.config.tie_word_embeddings == cfg.tie_word_embeddings
  ids, _, _ = _row(16)
  # float32 weights went through [in, out] and back bit for bit: logits are identical.
  np.testing.assert_array_equal(_torch_logits(reloaded, ids), _torch_logits(torch_model, ids))


@pytest.mark.slow
def test_packed_row_equals_per_sample_forwards(reference):
  """Three samples + padding in one row give each sample's own logits: fails if tokens leak
  across segments. (RoPE only sees position differences, so a missing position restart would
  not show here; `test_rope_uses_the_given_positions` covers positions.)"""
  _, torch_model, _, model = reference
  lengths, row_len = (7, 4, 9), 24
  rng = np.random.RandomState(1)
  samples = [rng.randint(0, VOCAB, n).astype(np.int32) for n in lengths]

  def row(parts):
    """One row: the samples back to back, positions restarting, then padding (segment 0)."""
    pad = row_len - sum(len(p) for p in parts)
    ids = np.concatenate(parts + [np.zeros(pad, np.int32)])
    positions = np.concatenate([np.arange(len(p)) for p in parts] + [np.arange(pad)])
    segments = np.concatenate([np.full(len(p), k + 1) for k, p in enumerate(parts)]
                              + [np.zeros(pad)])
    return ids, positions.astype(np.int32), segments.astype(np.int32)

  packed = np.asarray(_logits(model, *(x[None] for x in row(samples))))[0]
  assert np.isfinite(packed).all()  # padding too: no empty softmax
  alone = np.asarray(_logits(model, *(np.stack(x) for x in zip(*(row([s]) for s in samples)))))
  start = 0
  for k, sample in enumerate(samples):
    n = len(sample)
    np.testing.assert_allclose(packed[start:start + n], alone[k, :n], atol=1e-5, rtol=0)
    np.testing.assert_allclose(alone[k, :n], _torch_logits(torch_model, sample[None])[0],
                               atol=1e-4, rtol=0)
    start += n


def test_rope_uses_the_given_positions(reference):
  """Gapped positions change relative distances: logits must follow HF's `position_ids`, so a
  model that ignored `positions` (e.g. used arange) fails."""
  _, torch_model, _, model = reference
  ids, _, segments = _row(10, rows=1)
  positions = (3 * np.arange(10) + 5).astype(np.int32)[None]
  ours = np.asarray(_logits(model, ids, positions, segments))
  with torch.no_grad():
    expected = torch_model(torch.tensor(ids, dtype=torch.long),
                           position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
  plain = np.asarray(_logits(model, ids, np.arange(10, dtype=np.int32)[None], segments))
  assert np.abs(plain - ours).max() > 1e-2


@pytest.mark.slow
def test_multi_device_mesh_matches_single_device(reference):
  """Loading straight into shards (fsdp=2 x tensor=2) and running sharded changes nothing."""
  cfg, _, hf_dir, single_device_model = reference
  ids, positions, segments = _row(16, rows=4)
  single = np.asarray(_logits(single_device_model, ids, positions, segments))
  mesh = make_mesh(dict(fsdp=2, tensor=2))
  model = _load(cfg, hf_dir, mesh)
  kernel = model.model.layers.mlp.gate_proj.kernel.get_value()
  assert len(kernel.sharding.device_set) == 4 and not kernel.sharding.is_fully_replicated
  rows = [jax.device_put(x, batch_sharding(mesh)) for x in (ids, positions, segments)]
  with jax.set_mesh(mesh):  # activates the model's activation sharding constraints
    sharded = np.asarray(_logits(model, *rows))
  np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=0)


def test_bfloat16_compute_stays_close(reference):
  cfg, torch_model, hf_dir, _ = reference
  model = _load(cfg, hf_dir, _single_device_mesh(), compute_dtype="bfloat16")
  ids, positions, segments = _row(16)
  hidden = nnx.jit(lambda m, *a: m(*a))(model, ids, positions, segments)
  assert hidden.dtype == jnp.bfloat16
  assert model.model.layers.mlp.up_proj.kernel.get_value().dtype == jnp.float32  # fp32 master
  ours = np.asarray(nnx.jit(lambda m, h: m.logits(h))(model, hidden))
  reference_logits = _torch_logits(torch_model, ids)
  scale = np.abs(reference_logits).max()
  assert np.abs(ours - reference_logits).max() < 0.05 * scale


@pytest.mark.slow
def test_remat_changes_neither_loss_nor_gradients(tied_reference):
  """Tied: the gradient also reaches the shared embedding through the LM head."""
  cfg, _, hf_dir, _ = tied_reference
  mesh = _single_device_mesh()
  ids, positions, segments = _row(12)

  def loss_and_grads(remat):
    model = load_hf_weights(abstract_model(cfg, mesh, compute_dtype="float32", remat=remat),
                            hf_dir)
    graphdef, params = nnx.split(model)

    def loss_fn(params):
      m = nnx.merge(graphdef, params)
      return jnp.mean(m.logits(m(ids, positions, segments)) ** 2)
    return jax.jit(jax.value_and_grad(loss_fn))(params)

  loss_full, grads_full = loss_and_grads("full")
  loss_none, grads_none = loss_and_grads("none")
  np.testing.assert_allclose(loss_full, loss_none, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_full), jax.tree.leaves(grads_none)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
