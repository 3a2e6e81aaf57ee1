"""The PyTorch baseline of bench_train.py: transformers' Qwen3ForCausalLM, same rows (JSON line).

  python scripts/bench_torch_baseline.py                          # Qwen3-1.7B, 16,384-token rows
  python scripts/bench_torch_baseline.py --compile=layers         # + torch.compile per layer
  python scripts/bench_torch_baseline.py --preset=qwen3_tiny --pack=512 --batch=2 --steps=2 \
      --mean_len=128                                              # CPU smoke run

The stack a user would pick instead of jaxtune, at its best on one GPU without the flash-attn
package:
- the model is transformers' own `Qwen3ForCausalLM`, built from the jaxtune preset's HF config
  (`jaxtune.models.family(cfg.type).hf_config`), random init, or jaxtune's initial weights with
  `--load_hf=DIR` (written by `bench_train.py --export_hf=DIR`);
- the batch is bench_train's `packed_rows` (same seed: the same tokens, lengths and labels);
  positions restart in each sample (RoPE per sample);
- attention isolates the packed samples: `--attention=flex` (the default on CUDA) is
  `torch.nn.attention.flex_attention`, compiled, with a document-causal `BlockMask` built from
  the segment ids each step; `--attention=sdpa` (the default on CPU) is transformers' SDPA
  path with an explicit boolean [B, 1, T, T] document-causal mask (flex attention has no
  backward pass on the CPU; its forward there is the eager reference). The mask goes in as
  transformers' per-layer-type mask mapping, so transformers builds none of its own;
- `--precision=amp` (the default) keeps fp32 parameters, gradients and AdamW state and runs
  the model under `torch.autocast(bfloat16)`: jaxtune's fp32 master weights + bf16 compute.
  `bf16` stores everything in bfloat16 (less memory, not the same numerics); `fp32` uses no
  autocast (the CPU parity tests);
- activation checkpointing of every decoder layer (`gradient_checkpointing_enable`,
  non-reentrant; `--remat=none` turns it off), AdamW with `fused=True` on CUDA (foreach on
  the CPU), gradient clipping at 1.0, lr 1e-5;
- the loss: `--loss=chunked` (the default) runs the LM head and the fp32 cross-entropy over
  `--chunk` tokens at a time under checkpointing, so no [T, V] logits stay alive (jaxtune's
  chunked loss does the same work: every token through the head); `--loss=hf` is
  transformers' own `labels=` loss, which materialises the full fp32 logits;
- `--compile=layers` compiles each decoder layer (and the chunk loss) with torch.compile,
  `--compile=model` the whole decoder; `none` by default.

FLOPs, MFU and the peak FLOP/s table are jaxtune's (`train_flops`, `jaxtune.train.metrics`),
so both scripts report the same figures for the same work.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import inspect
import os
import sys
import time
import types
import warnings

# jaxtune's helpers import JAX; it must never take the GPU from torch (JAX preallocates).
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from bench_train import add_batch_args, batch_stats, emit, make_batch, model_config  # noqa: E402

_ATTENTION_NAME = "jaxtune_doc_flex"
_COMPILED_FLEX = {}


# ---- the model -------------------------------------------------------------------------------

def hf_config(model_cfg):
  """transformers' Qwen3Config for a jaxtune preset, from the family's own HF config."""
  import transformers  # pylint: disable=import-outside-toplevel

  from jaxtune.models import family  # pylint: disable=import-outside-toplevel
  fields = dict(family(model_cfg.type).hf_config(model_cfg, "float32"))
  model_type = fields.pop("model_type")
  for key in ("architectures", "dtype"):
    fields.pop(key, None)
  config = transformers.AutoConfig.for_model(model_type, **fields)
  config.use_cache = False
  return config


def _flex(device_type: str):
  """flex_attention, compiled on CUDA (the fused kernel); eager elsewhere (the reference
  implementation, slow but exact: CPU tests)."""
  from torch.nn.attention.flex_attention import flex_attention  # pylint: disable=import-outside-toplevel
  if device_type not in _COMPILED_FLEX:
    _COMPILED_FLEX[device_type] = (torch.compile(flex_attention, dynamic=False)
                                   if device_type == "cuda" else flex_attention)
  return _COMPILED_FLEX[device_type]


def doc_flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       **kwargs):
  """A transformers attention function: flex attention under a document-causal BlockMask.

  query [B, Hq, T, Dh], key / value [B, Hkv, T, Dh]; returns ([B, T, Hq, Dh], None) as
  transformers' own functions do. Under autocast, q / k leave the fp32 RMSNorm weights in
  fp32 while v is bf16: all three are cast to v's dtype (what SDPA's autocast does).
  """
  del module, kwargs
  if dropout:
    raise ValueError("flex attention here has no dropout")
  dtype = value.dtype
  with warnings.catch_warnings():
    # Off CUDA the eager reference is meant (tests): not worth its "use torch.compile" warning.
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
    out = _flex(query.device.type)(query.to(dtype), key.to(dtype), value,
                                   block_mask=attention_mask, scale=scaling,
                                   enable_gqa=query.shape[1] != key.shape[1])
  return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
  from transformers import AttentionInterface  # pylint: disable=import-outside-toplevel
  AttentionInterface.register(_ATTENTION_NAME, doc_flex_attention)


def set_attention(model, attention: str) -> None:
  """'flex' (our registered function) or 'sdpa' (transformers' own)."""
  name = {"flex": _ATTENTION_NAME, "sdpa": "sdpa"}[attention]
  if attention == "flex":
    _register_attention()
  try:
    model.set_attn_implementation(name)
  except (AttributeError, ValueError):  # older transformers: set the attribute directly
    model.config._attn_implementation = name  # pylint: disable=protected-access
  if model.config._attn_implementation != name:  # pylint: disable=protected-access
    raise RuntimeError(f"attention implementation is "
                       f"{model.config._attn_implementation!r}, not {name!r}")  # pylint: disable=protected-access


def load_hf_weights(model, hf_dir: str) -> None:
  """The safetensors of an HF directory (e.g. bench_train's --export_hf) into `model`."""
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors in {hf_dir}")
  state = {}
  for path in files:
    state.update(load_file(path))
  missing, unexpected = model.load_state_dict(state, strict=False)
  tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
  if unexpected or set(missing) - tied:
    raise ValueError(f"{hf_dir}: missing {sorted(set(missing) - tied)}, unexpected "
                     f"{sorted(unexpected)}")
  if tied and hasattr(model, "tie_weights"):
    model.tie_weights()


def build_model(model_cfg, *, device, precision: str = "amp", attention: str = "sdpa",
                load_hf: str = "", remat: str = "full"):
  import transformers  # pylint: disable=import-outside-toplevel
  config = hf_config(model_cfg)
  torch.manual_seed(0)
  with torch.device(device):
    model = transformers.Qwen3ForCausalLM(config)
  if load_hf:
    load_hf_weights(model, load_hf)
  model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
  set_attention(model, attention)
  if remat == "full":
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
      model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
      model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
  elif remat != "none":
    raise ValueError(f"--remat for torch is 'full' or 'none', got {remat!r}")
  model.train()
  return model


# ---- masks and loss --------------------------------------------------------------------------

def document_mask(segment_ids: torch.Tensor, attention: str):
  """The document-causal mask of [B, T] segment ids: token q sees kv iff same sample, kv <= q.

  'flex': a BlockMask (blocks of other samples skipped); 'sdpa': bool [B, 1, T, T]."""
  b, t = segment_ids.shape
  if attention == "sdpa":
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]
  from torch.nn.attention.flex_attention import create_block_mask  # pylint: disable=import-outside-toplevel

  def mask_mod(bi, hi, qi, ki):
    del hi
    return (segment_ids[bi, qi] == segment_ids[bi, ki]) & (qi >= ki)
  kwargs = {}
  if segment_ids.is_cuda and "_compile" in inspect.signature(create_block_mask).parameters:
    kwargs["_compile"] = True
  return create_block_mask(mask_mod, b, None, t, t, device=segment_ids.device, **kwargs)


def _ce_sum(hidden_nd, weight_vd, labels_n):
  logits = F.linear(hidden_nd, weight_vd)
  return F.cross_entropy(logits.float(), labels_n, ignore_index=-100, reduction="sum")


_COMPILED_CE = {}


def chunked_ce_sum(hidden_nd, weight_vd, labels_n, chunk: int, compiled: bool = False):
  """Sum of the cross-entropy over labels >= 0, `chunk` tokens at a time; each chunk's
  logits are recomputed in the backward pass instead of kept (checkpoint)."""
  fn = _ce_sum
  if compiled:
    fn = _COMPILED_CE.setdefault("ce", torch.compile(_ce_sum, dynamic=False))
  total = hidden_nd.new_zeros((), dtype=torch.float32)
  for start in range(0, hidden_nd.shape[0], chunk):
    stop = start + chunk
    total = total + checkpoint(fn, hidden_nd[start:stop], weight_vd, labels_n[start:stop],
                               use_reentrant=False)
  return total


def loss_sum(model, rows: dict, *, attention: str, loss: str = "chunked", chunk: int = 1024,
             compiled_loss: bool = False):
  """Summed token cross-entropy of packed rows (tensors [B, T] on the model's device)."""
  mask = document_mask(rows["segment_ids"], attention)
  masks = {"full_attention": mask}
  labels = rows["labels"]
  if loss == "hf":
    # transformers shifts: logits[t] is scored against labels[t + 1]; ours are pre-shifted.
    hf_labels = torch.full_like(labels, -100)
    hf_labels[:, 1:] = labels[:, :-1]
    out = model(input_ids=rows["input_ids"], attention_mask=masks,
                position_ids=rows["positions"], labels=hf_labels, use_cache=False)
    return out.loss.float() * (labels >= 0).sum()
  if loss != "chunked":
    raise ValueError(f"--loss is 'chunked' or 'hf', got {loss!r}")
  hidden = model.model(input_ids=rows["input_ids"], attention_mask=masks,
                       position_ids=rows["positions"], use_cache=False).last_hidden_state
  return chunked_ce_sum(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                        labels.reshape(-1), chunk, compiled_loss)


def isolated_loss(model, batch: dict[str, np.ndarray], device="cpu") -> float:
  """The mean token loss with every packed sample run alone through the model (transformers'
  own causal mask, positions from 0): what document masking must reproduce."""
  total, count = 0.0, 0
  with torch.no_grad():
    for r in range(batch["input_ids"].shape[0]):
      seg_row = batch["segment_ids"][r]
      for seg in np.unique(seg_row[seg_row > 0]):
        idx = np.nonzero(seg_row == seg)[0]
        ids = torch.as_tensor(batch["input_ids"][r, idx][None], dtype=torch.long, device=device)
        labels = torch.as_tensor(batch["labels"][r, idx], dtype=torch.long, device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
        total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
        count += int((labels >= 0).sum())
  return total / max(count, 1)


def to_device(batch: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
  return {k: torch.as_tensor(v, dtype=torch.long).to(device) for k, v in batch.items()}


# ---- the benchmark ---------------------------------------------------------------------------

def _peak_flops(device) -> float | None:
  from jaxtune.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  if device.type != "cuda":
    return None
  return metrics_lib.peak_flops_per_device(
      types.SimpleNamespace(device_kind=torch.cuda.get_device_name(device)))


def _sync(device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_batch_args(p)
  p.add_argument("--warmup", type=int, default=2, help="untimed steps (compile, autotune)")
  p.add_argument("--device", default="auto", help="auto (cuda if present) | cuda | cpu")
  p.add_argument("--attention", default="auto", choices=("auto", "flex", "sdpa"),
                 help="auto: flex on CUDA, sdpa elsewhere")
  p.add_argument("--precision", default="amp", choices=("amp", "bf16", "fp32"))
  p.add_argument("--remat", default="full", choices=("full", "none"))
  p.add_argument("--loss", default="chunked", choices=("chunked", "hf"))
  p.add_argument("--chunk", type=int, default=1024)
  p.add_argument("--compile", default="none", choices=("none", "layers", "model"))
  p.add_argument("--lr", type=float, default=1e-5)
  p.add_argument("--load_hf", default="", help="initial weights (bench_train --export_hf)")
  args = p.parse_args(argv)

  import transformers  # pylint: disable=import-outside-toplevel

  from jaxtune import models  # pylint: disable=import-outside-toplevel
  from jaxtune.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel

  t_start = time.perf_counter()
  device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                        if args.device == "auto" else args.device)
  attention = args.attention if args.attention != "auto" else (
      "flex" if device.type == "cuda" else "sdpa")
  if attention == "flex" and device.type != "cuda":
    raise SystemExit("flex attention has no backward pass off CUDA: use --attention=sdpa")
  if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  model_cfg = model_config(args)
  host = make_batch(args, model_cfg.vocab_size)
  model = build_model(model_cfg, device=device, precision=args.precision, attention=attention,
                      load_hf=args.load_hf, remat=args.remat)
  if args.compile == "layers":
    for layer in model.model.layers:
      layer.compile(dynamic=False)
  elif args.compile == "model":
    model.model.compile(dynamic=False)
  params = [q for q in model.parameters() if q.requires_grad]
  fused = device.type == "cuda"
  optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.01, **({"fused": True} if fused else
                                                      {"foreach": True}))
  batch = to_device(host, device)
  denominator = max(int((host["labels"] >= 0).sum()), 1)
  if args.batch % args.micro:
    raise SystemExit(f"--batch={args.batch} is not a multiple of --micro={args.micro}")
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "amp"
              else contextlib.nullcontext())

  def step() -> tuple[float, float]:
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, args.batch, args.micro):
      rows = {k: v[start:start + args.micro] for k, v in batch.items()}
      with autocast:
        summed = loss_sum(model, rows, attention=attention, loss=args.loss, chunk=args.chunk,
                          compiled_loss=args.compile != "none")
      (summed / denominator).backward()
      total += summed.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    optimizer.step()
    return float(total) / denominator, float(grad_norm)  # the host reads them: one sync

  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  _sync(device)
  init_s = time.perf_counter() - t_start
  t0 = time.perf_counter()
  first_loss, _ = step()
  first_step_s = time.perf_counter() - t0
  for _ in range(max(0, args.warmup - 1)):
    step()
  times, loss, grad_norm = [], first_loss, None
  for _ in range(args.steps):
    _sync(device)
    t0 = time.perf_counter()
    loss, grad_norm = step()
    times.append(time.perf_counter() - t0)

  step_time = float(np.median(times)) if times else first_step_s
  tokens = int((host["segment_ids"] > 0).sum())
  flops = models.family(model_cfg.type).train_flops(model_cfg, host)
  peak = _peak_flops(device)
  mfu = metrics_lib.mfu(flops, step_time, peak, 1)
  cuda = device.type == "cuda"
  result = dict(
      stack="torch", device=torch.cuda.get_device_name(device) if cuda else "cpu",
      n_devices=1, torch=torch.__version__, transformers=transformers.__version__,
      preset=args.preset, layers=model_cfg.num_hidden_layers, vocab=model_cfg.vocab_size,
      params=sum(q.numel() for q in model.parameters()), pack=args.pack,
      global_batch=args.batch, micro_batches=args.batch // args.micro, lengths=args.lengths,
      mean_len=args.mean_len, seed=args.seed, **batch_stats(host), attention=attention,
      remat=args.remat, loss_mode=args.loss, chunk=args.chunk, precision=args.precision,
      param_dtype="bfloat16" if args.precision == "bf16" else "float32",
      compute_dtype="float32" if args.precision == "fp32" else "bfloat16",
      compile=args.compile, optimizer="AdamW(fused)" if fused else "AdamW(foreach)",
      init_s=round(init_s, 2), compile_s=round(max(first_step_s - step_time, 0.0), 2),
      first_step_s=round(first_step_s, 3), step_time_s=round(step_time, 4),
      step_times_s=[round(t, 4) for t in times], tokens=tokens,
      tokens_per_sec=round(tokens / step_time, 1),
      tokens_per_sec_per_device=round(tokens / step_time, 1), flops_per_step=flops,
      model_tflops_per_sec_per_device=round(flops / step_time / 1e12, 2),
      peak_flops_per_device=peak, mfu=None if mfu is None else round(mfu, 4),
      first_loss=first_loss, loss=loss, grad_norm=grad_norm,
      peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
      reserved_gib=round(torch.cuda.max_memory_reserved(device) / 2**30, 3) if cuda else None,
      **metrics_lib.host_memory_gib(),
  )
  emit(result, args)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
