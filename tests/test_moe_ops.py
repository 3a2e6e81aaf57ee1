"""The MoE block (jaxtune/ops/moe.py) against transformers' Qwen3MoeSparseMoeBlock, a dense
per-expert loop, numpy versions of XTuner's losses, and itself on expert-parallel meshes
(the tiled grouped matmul, the default; ragged_dot is checked against both).

In-process meshes use conftest's 4 simulated CPU devices; the 8-device meshes run in one
subprocess of this file (`python tests/test_moe_ops.py`) with its own XLA_FLAGS.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from jaxtune.ops import moe
from jaxtune.parallel.mesh import make_mesh
from jaxtune.parallel.sharding import logical_to_spec

N, D, E, F, K = 48, 16, 8, 12, 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(seed: int, n: int = N, e: int = E) -> dict[str, np.ndarray]:
  """Random float32 inputs with O(1) outputs; distinct experts, so a wrong order shows."""
  rng = np.random.default_rng(seed)
  f32 = lambda *s, scale=1.0: (scale * rng.standard_normal(s)).astype(np.float32)
  return dict(x=f32(n, D), router=f32(D, e), gate=f32(e, D, F, scale=0.4),
              up=f32(e, D, F, scale=0.4), down=f32(e, F, D, scale=0.4), ct=f32(n, D))


# --- transformers' reference ----------------------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_route_and_experts_match_hf_sparse_moe_block(norm_topk_prob):
  """Forward (router logits, choices, weights, output) and the gradients of <y, ct> w.r.t.
  x, the router and the experts, against HF's eager per-expert loop in float32."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
  p = _params(0)
  cfg = transformers.Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E,
                                    num_experts_per_tok=K, norm_topk_prob=norm_topk_prob)
  cfg._experts_implementation = "eager"  # HF's per-expert loop, the plainest reference
  block = Qwen3MoeSparseMoeBlock(cfg).float()
  with torch.no_grad():
    block.gate.weight.copy_(torch.from_numpy(p["router"].T))  # [E, D]
    # HF 5 fuses the experts: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F].
    gate_up = np.concatenate([p["gate"], p["up"]], axis=2).transpose(0, 2, 1)
    block.experts.gate_up_proj.copy_(torch.from_numpy(np.ascontiguousarray(gate_up)))
    block.experts.down_proj.copy_(torch.from_numpy(np.ascontiguousarray(
        p["down"].transpose(0, 2, 1))))
  x_t = torch.from_numpy(p["x"].copy()).requires_grad_(True)
  y_t = block(x_t.view(2, N // 2, D)).reshape(N, D)
  torch.sum(y_t * torch.from_numpy(p["ct"])).backward()
  with torch.no_grad():
    logits_hf, scores_hf, idx_hf = (t.numpy() for t in block.gate(x_t))
  g_gate_up = block.experts.gate_up_proj.grad.numpy().transpose(0, 2, 1)
  grads_hf = [x_t.grad.numpy(), block.gate.weight.grad.numpy().T, g_gate_up[:, :, :F],
              g_gate_up[:, :, F:], block.experts.down_proj.grad.numpy().transpose(0, 2, 1)]

  def block_jax(x, router, gate, up, down):
    routing = moe.route(x, router, top_k=K, norm_topk_prob=norm_topk_prob)
    y = moe.moe_experts(x, routing, gate, up, down)
    return jnp.sum(y * p["ct"]), (y, routing)

  args = [jnp.asarray(p[k]) for k in ("x", "router", "gate", "up", "down")]
  grads, (y, routing) = jax.grad(block_jax, argnums=range(5), has_aux=True)(*args)
  assert routing.experts_nk.dtype == jnp.int32 and routing.weights_nk.dtype == jnp.float32
  np.testing.assert_allclose(routing.logits_ne, logits_hf, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(routing.experts_nk, idx_hf)
  np.testing.assert_allclose(routing.weights_nk, scores_hf, atol=1e-6, rtol=0)
  if norm_topk_prob:
    np.testing.assert_allclose(np.sum(routing.weights_nk, axis=-1), 1.0, atol=1e-6)
  y_hf = y_t.detach().numpy()
  assert np.abs(y_hf).max() > 0.5
  np.testing.assert_allclose(y, y_hf, atol=1e-5, rtol=0)
  for name, g, g_hf in zip(["x", "router", "gate", "up", "down"], grads, grads_hf):
    assert np.abs(g_hf).max() > 1e-2, name
    np.testing.assert_allclose(g, g_hf, atol=5e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parity
def test_balancing_loss_relation_to_hf_load_balancing_loss_func():
  """One layer: HF's value is exactly top_k times XTuner's (same padding mask); two
  identical layers: HF averages them (same value), XTuner sums (twice)."""
  torch = pytest.importorskip("torch")
  from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
  p = _params(1)
  routing = moe.route(jnp.asarray(p["x"]), jnp.asarray(p["router"]), top_k=K,
                      norm_topk_prob=True)
  valid_n = np.arange(N) % 7 != 3
  ours = float(moe.load_balancing_loss(routing, jnp.asarray(valid_n), num_experts=E, top_k=K))
  logits_t = torch.from_numpy(np.array(routing.logits_ne))
  mask_t = torch.from_numpy(valid_n.astype(np.int64)).view(2, N // 2)
  hf_one = float(load_balancing_loss_func((logits_t,), E, K, mask_t))
  hf_two = float(load_balancing_loss_func((logits_t, logits_t), E, K, mask_t))
  np.testing.assert_allclose(hf_one, K * ours, rtol=1e-5)
  np.testing.assert_allclose(hf_two, hf_one, rtol=1e-5)


# --- grouped matmul against the dense loop --------------------------------------------------

def _forward_and_grads(fn, x, w_nk, e_nk, gate, up, down, ct):
  """y and d<y, ct>/d(x, routing weights, gate, up, down)."""
  def loss(x, w, g, u, d):
    y = fn(x, moe.Routing(w, e_nk, None), g, u, d)
    return jnp.sum(y.astype(jnp.float32) * ct), y
  grads, y = jax.jit(jax.grad(loss, argnums=range(5), has_aux=True))(x, w_nk, gate, up, down)
  return y, grads


def _edge_routing(rng, tile: int):
  """Routing whose group sizes hit the tile edges: experts 0 and 4 idle, 1, 2, 3 and 7
  exact multiples of `tile`, 5 and 6 not (M = N K = 96 assignments)."""
  sizes = np.array([0, 4, 3, 1, 0, 6, 5, 0]) * tile
  sizes[5] += 3
  sizes[6] -= 3
  sizes[7] = N * K - sizes.sum()
  assert sizes[7] % tile == 0 and sizes.max() <= N
  # Token n takes list entries n and n + N: distinct experts, as no group is longer than N.
  ids = np.repeat(np.arange(E), sizes)
  e_nk = np.stack([ids[:N], ids[N:]], axis=1)[rng.permutation(N)]
  assert (e_nk[:, 0] != e_nk[:, 1]).all()
  return jnp.asarray(e_nk, jnp.int32), jnp.asarray(rng.uniform(0.1, 1.0, (N, K)), jnp.float32)


# T = 4 makes groups of several tiles; the default tile runs in every other test.
GROUPED = {"tiled_4": dict(impl="tiled", tile=4), "ragged_dot": dict(impl="ragged_dot")}


@pytest.mark.parametrize("case", ["routed", "idle_and_tile_edges"])
def test_grouped_matches_dense_loop_values_and_grads(case):
  """Both grouped matmuls (tiled at T = 4, ragged_dot) against the dense loop and each
  other: y and every gradient, routed by the router or with idle experts and groups of an
  exact multiple of T and not."""
  p = _params(2)
  x = jnp.asarray(p["x"])
  if case == "routed":
    routing = moe.route(x, jnp.asarray(p["router"]), top_k=K, norm_topk_prob=False)
    w_nk, e_nk = routing.weights_nk, routing.experts_nk
  else:
    e_nk, w_nk = _edge_routing(np.random.default_rng(3), tile=4)
  args = (x, w_nk, e_nk, p["gate"], p["up"], p["down"], p["ct"])
  y_ref, grads_ref = _forward_and_grads(moe.moe_experts_dense_loop, *args)
  assert np.abs(y_ref).max() > 0.5
  got = {name: _forward_and_grads(functools.partial(moe.moe_experts, **kw), *args)
         for name, kw in GROUPED.items()}
  for impl, (y, grads) in got.items():
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=0, err_msg=impl)
    for name, g, g_ref in zip(["x", "weights", "gate", "up", "down"], grads, grads_ref):
      assert np.abs(g_ref).max() > 1e-2, name
      np.testing.assert_allclose(g, g_ref, atol=5e-5, rtol=1e-5, err_msg=f"{impl} {name}")
    if case == "idle_and_tile_edges":
      for g in grads[2:]:
        np.testing.assert_array_equal(np.asarray(g)[[0, 4]], 0.0, err_msg=impl)
  y_tiled, grads_tiled = got["tiled_4"]
  y_ragged, grads_ragged = got["ragged_dot"]
  np.testing.assert_allclose(y_tiled, y_ragged, atol=2e-5, rtol=0)
  for g, g_ragged in zip(grads_tiled, grads_ragged):
    np.testing.assert_allclose(g, g_ragged, atol=5e-5, rtol=1e-5)


def test_tile_layout_pads_each_group_to_whole_tiles():
  """Every tile holds rows of one expert, each assignment sits in exactly one row, padding
  rows point past the end (M), and the used tiles are sum_g ceil(s_g / T)."""
  tile = 4
  e_nk, _ = _edge_routing(np.random.default_rng(3), tile)
  m = N * K
  src_lt, expert_l, used = (np.asarray(a) for a in jax.jit(
      lambda e: moe._tile_layout(e, 0, E, tile))(e_nk))  # pylint: disable=protected-access
  sizes = np.bincount(np.asarray(e_nk).ravel(), minlength=E)
  assert int(used) == np.sum(-(-sizes // tile))
  assert src_lt.shape == (moe.num_tiles(m, E, tile), tile) and (src_lt[int(used):] == m).all()
  real = src_lt < m
  np.testing.assert_array_equal(np.sort(src_lt[real]), np.arange(m))
  flat_e = np.asarray(e_nk).ravel()
  for l in range(int(used)):
    assert (flat_e[src_lt[l][real[l]]] == expert_l[l]).all() and real[l, 0]
  assert list(expert_l[:int(used)]) == sorted(expert_l[:int(used)])


def test_one_device_mesh_is_the_plain_path():
  """Axes of size 1 split nothing: the same program as without a mesh (no shard_map)."""
  p = _params(9)
  x = jnp.asarray(p["x"])
  routing = moe.route(x, jnp.asarray(p["router"]), top_k=K, norm_topk_prob=True)
  plain = jax.make_jaxpr(moe.moe_experts)(x, routing, p["gate"], p["up"], p["down"])
  mesh = make_mesh({}, devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    axes = _mesh_axes(mesh, x.shape, p["gate"].shape)
    assert axes["token_axes"] and axes["expert_axes"], axes
    meshed = jax.make_jaxpr(functools.partial(moe.moe_experts, **axes))(
        x, routing, p["gate"], p["up"], p["down"])
  prims = lambda jaxpr: [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]  # noqa: E731
  assert prims(meshed) == prims(plain) and "shard_map" not in str(meshed)


def test_bfloat16_close_to_float32():
  p = _params(4)
  x = jnp.asarray(p["x"])
  routing = moe.route(x, jnp.asarray(p["router"]), top_k=K, norm_topk_prob=True)
  ref = moe.moe_experts_dense_loop(x, routing, p["gate"], p["up"], p["down"])
  x16 = x.astype(jnp.bfloat16)
  y16 = moe.moe_experts(x16, routing, p["gate"], p["up"], p["down"])
  dense16 = moe.moe_experts_dense_loop(x16, routing, p["gate"], p["up"], p["down"])
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(dense16, np.float32),
                             atol=2e-2, rtol=0)
  np.testing.assert_allclose(np.asarray(y16, np.float32), ref, atol=3e-2, rtol=3e-2)


# --- losses against numpy -------------------------------------------------------------------

def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _np_topk_ids(logits, k):
  return np.argsort(-_np_softmax(logits), axis=-1, kind="stable")[:, :k]


def _np_xtuner_balancing(logits, valid, e, k):
  """XTuner's BalancingLossContext.finalize, local branch: E/(n k) * sum_e c_e * P_e."""
  lv = logits[valid]
  n = max(len(lv), 1)
  counts = np.bincount(_np_topk_ids(lv, k).ravel(), minlength=e)
  return e / (n * k) * np.sum(counts * (_np_softmax(lv).sum(0) / n))


def _np_xtuner_balancing_global(logits_per_rank, valid_per_rank, e, k):
  """The global-average branch: counts and probability sums all-reduced over ranks."""
  counts = sum(np.bincount(_np_topk_ids(lg[v], k).ravel(), minlength=e)
               for lg, v in zip(logits_per_rank, valid_per_rank))
  prob_sum = sum(_np_softmax(lg[v]).sum(0) for lg, v in zip(logits_per_rank, valid_per_rank))
  tokens_global = counts.sum()
  return e / tokens_global * np.sum(counts * prob_sum / (tokens_global // k))


def test_losses_and_counts_match_numpy_and_skip_padding():
  p = _params(5)
  routing = moe.route(jnp.asarray(p["x"]), jnp.asarray(p["router"]), top_k=K,
                      norm_topk_prob=True)
  logits = np.asarray(routing.logits_ne, np.float64)
  valid = np.ones(N, bool)
  valid[-9:] = False  # a padded tail
  valid[10] = False
  valid_j = jnp.asarray(valid)
  np.testing.assert_array_equal(_np_topk_ids(logits, K), routing.experts_nk)

  counts = moe.expert_counts(routing, valid_j, E)
  assert counts.dtype == jnp.int32
  np.testing.assert_array_equal(counts, np.bincount(_np_topk_ids(logits[valid], K).ravel(),
                                                    minlength=E))
  assert int(counts.sum()) == K * valid.sum()

  lb = moe.load_balancing_loss(routing, valid_j, num_experts=E, top_k=K)
  np.testing.assert_allclose(lb, _np_xtuner_balancing(logits, valid, E, K), rtol=1e-5)
  halves = [slice(0, N // 2), slice(N // 2, N)]
  np.testing.assert_allclose(lb, _np_xtuner_balancing_global(
      [logits[h] for h in halves], [valid[h] for h in halves], E, K), rtol=1e-5)
  # Padding changes nothing: garbage logits on padded tokens give the same loss.
  junk = routing._replace(logits_ne=jnp.where(valid_j[:, None], routing.logits_ne, 1e4),
                          experts_nk=jnp.where(valid_j[:, None], routing.experts_nk, 0))
  np.testing.assert_allclose(moe.load_balancing_loss(junk, valid_j, num_experts=E, top_k=K),
                             lb, rtol=1e-6)
  np.testing.assert_array_equal(moe.expert_counts(junk, valid_j, E), counts)

  lse = np.log(np.exp(logits[valid]).sum(-1))
  z = moe.router_z_loss(routing, valid_j)
  np.testing.assert_allclose(z, np.mean(lse ** 2), rtol=1e-5)
  np.testing.assert_allclose(moe.router_z_loss(junk, valid_j), z, rtol=1e-6)

  # A perfectly balanced router gives 1 per layer; a collapsed one gives E / K.
  ids = np.stack([np.arange(N) % E, (np.arange(N) + 1) % E], axis=1)
  flat = moe.Routing(jnp.ones((N, K)) / K, jnp.asarray(ids, jnp.int32), jnp.zeros((N, E)))
  np.testing.assert_allclose(moe.load_balancing_loss(flat, jnp.ones(N, bool), num_experts=E,
                                                     top_k=K), 1.0, rtol=1e-6)
  collapsed = moe.Routing(flat.weights_nk, jnp.tile(jnp.arange(K, dtype=jnp.int32), (N, 1)),
                          jnp.asarray(np.tile([30.0] * K + [0.0] * (E - K), (N, 1))))
  np.testing.assert_allclose(moe.load_balancing_loss(collapsed, jnp.ones(N, bool),
                                                     num_experts=E, top_k=K), E / K, rtol=1e-5)
  # All padding: finite zero, not 0/0.
  none = jnp.zeros(N, bool)
  assert float(moe.load_balancing_loss(routing, none, num_experts=E, top_k=K)) == 0.0
  assert float(moe.router_z_loss(routing, none)) == 0.0


def test_balancing_loss_gradient_flows_through_probabilities_only():
  p = _params(6)
  x, kernel = jnp.asarray(p["x"]), jnp.asarray(p["router"])
  valid = jnp.arange(N) < N - 5

  def loss(kernel):
    r = moe.route(x, kernel, top_k=K, norm_topk_prob=True)
    return moe.load_balancing_loss(r, valid, num_experts=E, top_k=K)

  def by_hand(kernel):  # counts frozen at their values, probabilities differentiated
    logits = x @ kernel
    r = moe.route(x, kernel, top_k=K, norm_topk_prob=True)
    c = jax.lax.stop_gradient(moe.expert_counts(r, valid, E)).astype(jnp.float32)
    pm = jnp.sum(jnp.where(valid[:, None], jax.nn.softmax(logits), 0), 0) / valid.sum()
    return E / (valid.sum() * K) * jnp.sum(c * pm)

  np.testing.assert_allclose(jax.grad(loss)(kernel), jax.grad(by_hand)(kernel), atol=1e-6)


# --- expert parallelism ---------------------------------------------------------------------

def _mesh_axes(mesh, x_shape, gate_shape) -> dict:
  """The mesh axes of moe_experts as the model computes them (logical-axis rules)."""
  tok = logical_to_spec(("activation_batch", None), x_shape, mesh)
  w = logical_to_spec(("experts", "embed", "mlp"), gate_shape, mesh)
  return dict(token_axes=tok[0], expert_axes=w[0], mlp_axes=w[2])


@functools.cache
def _block_grad_fn(e: int, token_axes=(), expert_axes=(), mlp_axes=()):
  """jit(grad) of route + moe_experts (+ both losses) w.r.t. x, router and the experts;
  cached so every reference of one expert count shares one compiled function."""
  def loss(x, router, gate, up, down, ct, valid):
    r = moe.route(x, router, top_k=K, norm_topk_prob=True, token_axes=token_axes)
    y = moe.moe_experts(x, r, gate, up, down, token_axes=token_axes, expert_axes=expert_axes,
                        mlp_axes=mlp_axes)
    aux = (moe.load_balancing_loss(r, valid, num_experts=e, top_k=K)
           + moe.router_z_loss(r, valid))
    return jnp.sum(y * ct) + aux, (y, aux, moe.expert_counts(r, valid, e))
  return jax.jit(jax.grad(loss, argnums=range(5), has_aux=True))


def _block_and_grads(p, mesh=None, e=E):
  """(y, aux loss, counts, gradients) on `mesh` with every input placed by the
  logical-axis rules and the experts split as the model splits them, else on one device."""
  n = p["x"].shape[0]
  args = [p[k] for k in ("x", "router", "gate", "up", "down", "ct")] + [np.arange(n) % 5 != 4]
  if mesh is None:
    grads, aux = _block_grad_fn(e)(*args)
  else:
    names = [("activation_batch", None), (None, None), ("experts", "embed", "mlp"),
             ("experts", "embed", "mlp"), ("experts", "mlp", "embed"),
             ("activation_batch", None), ("activation_batch",)]
    args = [jax.device_put(a, NamedSharding(mesh, logical_to_spec(nm, a.shape, mesh)))
            for a, nm in zip(args, names)]
    axes = _mesh_axes(mesh, p["x"].shape, p["gate"].shape)
    with jax.set_mesh(mesh):
      grads, aux = _block_grad_fn(e, **axes)(*args)
  return [np.asarray(a) for a in (*aux, *grads)]


_OUT_NAMES = ["y", "aux", "counts", "dx", "drouter", "dgate", "dup", "ddown"]


def _ep_errors(sizes: dict, n: int = N, e: int = E) -> dict:
  """Max abs difference of every output and gradient, mesh vs single device, plus how far
  a wrong expert order and a dropped token would move y (must dwarf the tolerance)."""
  p = _params(7, n=n, e=e)
  ref = _block_and_grads(p, e=e)
  mesh = make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
  got = _block_and_grads(p, mesh, e=e)
  out = {name: float(np.abs(a - b).max()) for name, a, b in zip(_OUT_NAMES, got, ref)}
  rolled = _block_and_grads({**p, "gate": np.roll(p["gate"], 1, axis=0)}, e=e)
  out["rolled_experts_y"] = float(np.abs(rolled[0] - ref[0]).max())
  out["scale_y"] = float(np.abs(ref[0]).max())
  out["min_token_norm"] = float(np.linalg.norm(ref[0], axis=1).min())  # no token left at 0
  out["token_spec"] = str(logical_to_spec(("activation_batch", None), (n, D), mesh))
  out["expert_spec"] = str(logical_to_spec(("experts", "embed", "mlp"), (e, D, F), mesh))
  return out


def _assert_ep(errs: dict) -> None:
  for name in _OUT_NAMES:
    assert errs[name] < 2e-5, (name, errs)
  assert errs["rolled_experts_y"] > 1e-1 and errs["scale_y"] > 0.5, errs
  assert errs["min_token_norm"] > 1e-2, errs


EP_MESHES_4 = {
    "expert4": (dict(expert=4), N, E),
    "expert2_tensor2": (dict(expert=2, tensor=2), N, E),
    # N = 6 does not divide data x fsdp x expert: tokens split over fsdp only, experts psum.
    "tokens_not_on_expert_axis": (dict(fsdp=2, expert=2), 6, E),
    # E = 6 does not divide expert = 4: experts replicated, every device runs all of them.
    "experts_indivisible": (dict(expert=4), N, 6),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EP_MESHES_4))
def test_expert_parallel_matches_single_device_4(case):
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices")
  sizes, n, e = EP_MESHES_4[case]
  errs = _ep_errors(sizes, n, e)
  if case == "tokens_not_on_expert_axis":
    assert "expert" not in errs["token_spec"] and "expert" in errs["expert_spec"], errs
  if case == "experts_indivisible":
    assert "expert" in errs["token_spec"] and "expert" not in errs["expert_spec"], errs
  _assert_ep(errs)


EP_MESHES_8 = {
    "expert8": dict(expert=8),
    "fsdp2_expert4": dict(fsdp=2, expert=4),
    "data2_expert2_tensor2": dict(data=2, expert=2, tensor=2),
}


@pytest.fixture(scope="module", autouse=True)
def _ep8_worker(request):
  """Starts the 8-device subprocess when the module starts, if its test is selected, so it
  compiles while the in-process tests run (the file's budget is ~60 s on 2 cores)."""
  wanted = any(item.name == "test_expert_parallel_matches_single_device_8"
               for item in request.session.items)
  proc = None
  if wanted:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).strip(
               os.pathsep)}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  yield proc
  if proc is not None and proc.poll() is None:
    proc.kill()
    proc.communicate()


def test_expert_parallel_matches_single_device_8(_ep8_worker):
  out, err = _ep8_worker.communicate(timeout=300)
  assert _ep8_worker.returncode == 0, err[-4000:]
  results = json.loads(out.strip().splitlines()[-1])
  assert set(results) == set(EP_MESHES_8)
  for name, errs in results.items():
    assert "expert" in errs["token_spec"] and "expert" in errs["expert_spec"], (name, errs)
    _assert_ep(errs)


def test_rejects_bad_shapes_and_arguments():
  p = _params(8)
  x = jnp.asarray(p["x"])
  r = moe.route(x, jnp.asarray(p["router"]), top_k=K, norm_topk_prob=True)
  with pytest.raises(ValueError, match="expected x"):
    moe.moe_experts(x, r, p["gate"], p["up"], p["down"][:, :, :-1])
  with pytest.raises(ValueError, match="top_k"):
    moe.route(x, jnp.asarray(p["router"]), top_k=E + 1, norm_topk_prob=True)
  with pytest.raises(ValueError, match="impl"):
    moe.moe_experts(x, r, p["gate"], p["up"], p["down"], impl="dense")
  with pytest.raises(ValueError, match="tile"):
    moe.moe_experts(x, r, p["gate"], p["up"], p["down"], tile=0)
  with pytest.raises(ValueError, match="needs a mesh"):  # axes without a mesh
    moe.moe_experts(x, r, p["gate"], p["up"], p["down"], expert_axes="expert")
  with pytest.raises(ValueError, match="needs a mesh"):
    moe.route(x, jnp.asarray(p["router"]), top_k=K, norm_topk_prob=True, token_axes="data")
  if jax.device_count() >= 4:
    with jax.set_mesh(make_mesh(dict(expert=4), jax.devices()[:4])):
      with pytest.raises(ValueError, match="E = 6"):
        moe.moe_experts(x, r, p["gate"][:6], p["up"][:6], p["down"][:6], expert_axes="expert")


if __name__ == "__main__":  # the 8-device worker of test_expert_parallel_matches_single_device_8
  assert jax.device_count() == 8, jax.devices()
  print(json.dumps({name: _ep_errors(sizes) for name, sizes in EP_MESHES_8.items()}))
