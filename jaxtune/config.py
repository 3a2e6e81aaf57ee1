"""Recipe configuration: every key at its default, and the checks run before any heavy work.

A recipe file defines `get_config(arg=None)` returning `base_config()` with its changes. Key
names follow XTuner's (docs/training.md, "Config keys"). `validate` turns every mistake a
user can make in a recipe into one `ConfigError` that names the key and the fix; `resolve`
adds every value derived from the recipe and the devices (`Resolved`), computed once, here.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
from typing import Any

import jax.numpy as jnp
from ml_collections import ConfigDict, FieldReference, config_dict

from jaxtune.data import templates, tokenizer_files
from jaxtune.data.media import MediaSpec, tiles_bound
from jaxtune.models import lora, presets
from jaxtune.models.lora import DEFAULT_LORA_TARGETS
from jaxtune.models.layers import REMAT
from jaxtune.ops import attention
from jaxtune.ops.rope import normalize_rope_scaling
from jaxtune.parallel import sharding
from jaxtune.parallel.mesh import AXES


class ConfigError(ValueError):
  """A recipe mistake, reported before anything is loaded or written."""


log = logging.getLogger(__name__)


def dataset(name: str, anno_path: str, sample_ratio: float = 1.0, media_root: str = "",
            chat_template: str = "qwen3", sample_max_length: int | None = None,
            allow_outside_media_root: bool = False) -> dict:
  """One entry of `data.datasets`; `sample_max_length` overrides `data.sample_max_length`.

  Image paths are joined to `media_root` (to the current directory when it is "") and must
  resolve (symlinks followed) inside it: a line whose image is outside, by `../` or an
  absolute path, is a bad line unless `allow_outside_media_root=True`."""
  return dict(name=name, anno_path=anno_path, sample_ratio=float(sample_ratio),
              media_root=media_root, chat_template=chat_template,
              sample_max_length=sample_max_length,
              allow_outside_media_root=allow_outside_media_root)


def base_config() -> ConfigDict:
  """Every key jaxtune reads, at its default. Recipes start from this."""
  c = ConfigDict()
  c.model = presets.qwen3_0_6b()
  c.load_from = config_dict.placeholder(str)       # HF directory; None = random init
  # True: with load_from set, `model` is presets.from_hf(load_from) (the recipe's training
  # fields, e.g. freeze_vision, kept) and tokenizer_path is load_from, so one recipe is both a
  # from-scratch demo and, with --config.load_from=DIR, the real run (configs/sft_mini.py).
  c.model_from_checkpoint = False
  c.tokenizer_path = config_dict.placeholder(str)  # HF tokenizer directory

  c.data = ConfigDict()
  c.data.datasets = []                 # list of `dataset(...)` dicts
  c.data.sample_max_length = 2048      # longer samples are truncated, with a warning
  c.data.pack_max_length = 4096        # tokens per packed row
  c.data.pack_level = "soft"           # soft | hard | none ('expand_soft' = soft)
  c.data.num_workers = 0               # 0 = sized from the CPUs available
  c.data.cache_dir = config_dict.placeholder(str)
  c.data.seed = 42
  c.data.micro_batch_size = 1          # packed rows per data-parallel rank per forward pass
  c.data.skip_bad_samples = False      # True: skip malformed lines (counted, first few reported)
  c.data.pack_buffer_size = 100        # soft packing's look-ahead buffer (XTuner: 100)
  c.data.prefetch = 2                  # packed batches prepared ahead of the step
  c.data.min_dynamic_patch = 1         # Intern-S1 image tiling: tiles per image, min and max
  c.data.max_dynamic_patch = 12
  c.data.max_tiles_per_pack = config_dict.placeholder(int)  # image tiles per packed row; None =
                                       # pack_max_length // tokens per tile (never binding)
  c.data.image_cache_mb = 512          # decoded tiles kept per host (repeated images, epochs)
  c.data.round_up = True               # XTuner's: ceil(packs / batch) steps, last batch topped up
  c.data.group_by_length = True        # XTuner's: micro-batches of packs of similar attention cost
  c.data.cache_max_gib = config_dict.placeholder(float)  # prune cache_dir (oldest first) to this

  c.optim = ConfigDict(dict(lr=6e-5, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-8,
                            max_grad_norm=1.0))
  # XTuner's: skip the update of a step whose gradient norm exceeds this (None = never).
  c.optim.skip_grad_norm_threshold = config_dict.placeholder(float)
  # Adam's moments (mu, nu): float32, or bfloat16 to halve the optimizer state (the update is
  # still computed in float32; jaxtune.train.optim.scale_by_adam_stored_in).
  c.optim.state_dtype = "float32"
  c.lr = ConfigDict(dict(lr_type="cosine", warmup_ratio=0.03, lr_min=1e-6))
  # With warmup 0, updates 0 and 1 both run at optim.lr and the decay follows one update late,
  # as XTuner's torch SequentialLR chain does (jaxtune.train.optim.lr_schedule); False: the
  # decay starts at update 0.
  c.lr.zero_warmup_repeats_base_lr = True
  c.loss = ConfigDict(dict(mode="chunk", chunk_size=1024, loss_reduction="token"))
  # sequence: the tokens of each packed row split over that many devices (context
  # parallelism for long rows; ops/attention.py), params sharded over it as over fsdp.
  c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1, sequence=1))
  # Overrides of the logical-axis rules (jaxtune.parallel.sharding.DEFAULT_RULES): (name, mesh
  # axes) pairs; a name listed here gets exactly these rules, e.g. (("embed", None),) = no FSDP.
  c.mesh.logical_axis_rules = ()

  c.param_dtype = "float32"            # master weights
  c.compute_dtype = "bfloat16"         # 'float32' gives exact parity with the reference on CPU
  # What each layer keeps for the backward pass (jaxtune.models.layers.remat_policy): full
  # (its input only, recompute the rest) | dots (weight-matmul outputs) | save_attention
  # (the attention output) | offload (the dots, in pinned host memory) | none (everything).
  c.remat = "full"
  c.attention = "auto"                 # auto (cudnn on GPU, else blockwise) | blockwise | xla |
                                       # pallas (GPU packed kernel, no [T, T] mask) |
                                       # cudnn

  c.global_batch_size = 8              # packed rows per optimizer step, all ranks
  c.epoch_num = config_dict.placeholder(int)    # exactly one of these two; on the command
  c.total_steps = config_dict.placeholder(int)  # line, 0 unsets one a recipe has set
  c.seed = 42
  c.work_dir = "work_dirs"
  c.checkpoint_interval = -1           # -1 = only at the end
  c.checkpoint_maxkeep = 2
  c.hf_interval = -1                   # -1 = only at the end
  c.hf_max_keep = 1
  c.auto_resume = False
  c.log_interval = 1
  c.progress_bar = True
  c.resume_from = config_dict.placeholder(str)  # checkpoint step dir, checkpoints dir or run dir
  c.load_weights_only = False          # with resume_from: params only (new optimizer, schedule)
  c.eval_datasets = []                 # `dataset(...)` dicts, packed like data.datasets
  c.eval_interval = -1                 # eval loss every n steps; -1 = only at the end
  c.max_consecutive_nonfinite = 10     # NaN/Inf steps in a row (each skipped) before stopping
  c.tensorboard = True                 # TensorBoard event files in <run>/tensorboard
  c.profile_steps = ()                 # (first, last): JAX profiler trace of those steps
  # LoRA (jaxtune.models.lora): rank 0 = off. targets: regular expressions (re.search) over HF
  # module paths ("model.layers.3.self_attn.q_proj"); the default is every attention and MLP
  # projection of the language model. init_from: a PEFT adapter directory; quantize_base:
  # none | int8 | nf4 (QLoRA).
  c.lora = ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets=DEFAULT_LORA_TARGETS,
                           init_from=config_dict.placeholder(str), quantize_base="none"))
  # Weights & Biases (pip install jaxtune[wandb]): process 0 logs every metrics.jsonl record
  # to the run `wandb_project` names (None = off); the run's id is kept in
  # <run>/wandb_id.txt, so auto_resume continues the same W&B run.
  c.observability = ConfigDict()
  c.observability.wandb_project = config_dict.placeholder(str)
  c.observability.wandb_entity = config_dict.placeholder(str)    # None = the default entity
  c.observability.wandb_run_name = config_dict.placeholder(str)  # None = the run directory's name
  c.observability.wandb_tags = ()
  c.observability.wandb_mode = config_dict.placeholder(str)      # None = W&B's (WANDB_MODE) |
                                                                 # online | offline | disabled
  return c


_DTYPES = ("float32", "bfloat16", "float16")
_CHOICES = {
    "data.pack_level": ("soft", "hard", "none"),
    "lr.lr_type": ("cosine", "linear", "constant"),
    "loss.mode": ("chunk", "eager"),
    "loss.loss_reduction": ("token", "sample", "square"),
    "param_dtype": _DTYPES,
    "compute_dtype": _DTYPES,
    "remat": REMAT,
    "optim.state_dtype": ("float32", "bfloat16"),
    "attention": attention.IMPLEMENTATIONS,
}


def _value(node: Any) -> Any:
  return node.get() if isinstance(node, FieldReference) else node


def _check_keys_and_types(cfg: ConfigDict, ref: ConfigDict, prefix: str) -> None:
  """Unknown keys and values whose type differs from the default's are errors."""
  ref_fields = ref._fields  # pylint: disable=protected-access
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if key not in ref_fields:
      raise ConfigError(f"unknown config key '{path}'. Known keys here: "
                        f"{', '.join(sorted(ref_fields))}. Check its spelling.")
    value, default = cfg[key], ref[key]
    if isinstance(default, ConfigDict):
      if not isinstance(value, ConfigDict):
        raise ConfigError(f"config key '{path}' must be a section (ConfigDict), got {value!r}")
      _check_keys_and_types(value, default, path + ".")
      continue
    ref_node = ref_fields[key]
    if ref_node is None:  # a free-form field (model.rope_scaling): its own check follows
      continue
    expected = ref_node.get_type() if isinstance(ref_node, FieldReference) else type(default)
    if value is None or expected in (type(None), list, tuple) and isinstance(value, (list, tuple)):
      continue
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
      continue
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
      raise ConfigError(f"config key '{path}' must be {expected.__name__}, got "
                        f"{type(value).__name__} ({value!r}). Fix it in the recipe or the "
                        f"--config.{path}=... override.")


def _get(cfg: ConfigDict, path: str) -> Any:
  node = cfg
  for part in path.split("."):
    node = node[part]
  return node


def axis_rules(cfg: ConfigDict) -> sharding.Rules:
  """The run's logical-axis rules: the defaults with `mesh.logical_axis_rules` applied."""
  try:
    return sharding.merge_rules(cfg.mesh.get("logical_axis_rules", ()))
  except ValueError as e:
    raise ConfigError(f"config key {e}") from None


def data_parallel_size(cfg: ConfigDict, num_devices: int) -> int:
  """Ranks that see different rows: the product of the data-parallel axes' sizes (-1
  resolved). Those axes come from the rules (`sharding.batch_axes`): data x fsdp x expert by
  default, since an expert-parallel group is data parallel outside the MoE blocks. A run
  reads it from `resolve(...).data_parallel`.
  """
  sizes = mesh_shape(cfg, num_devices)
  return math.prod(sizes[axis] for axis in sharding.batch_axes(axis_rules(cfg)))


def mesh_shape(cfg: ConfigDict, num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with the single -1 resolved to the devices left over."""
  sizes = {axis: int(cfg.mesh.get(axis, 1)) for axis in AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f"at most one mesh axis may be -1, got {free}. Set all but one explicitly.")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ConfigError(f"mesh axis sizes must be positive or -1, got {sizes}")
  fixed = 1
  for s in sizes.values():
    fixed *= s if s != -1 else 1
  if free:
    if num_devices % fixed:
      raise ConfigError(f"{num_devices} devices cannot be split over fixed mesh axes {sizes}: "
                        f"their product {fixed} must divide the device count.")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f"mesh {sizes} has {fixed} positions but there are {num_devices} devices; "
                      "set one axis to -1 or make the product match.")
  return sizes


def validate(cfg: ConfigDict, num_devices: int | None = None, *, files: bool = True
             ) -> ConfigDict:
  """Checks a recipe; returns it with aliases resolved. Raises ConfigError on the first mistake.

  num_devices: also check the batch against the mesh on that many devices.
  files=False: skip the checks of the files a run reads or writes (datasets, tokenizer,
  work_dir, resume_from), for planning from abstract state (jaxtune.plan)."""
  base = base_config()
  family = cfg.model.get("type") if "model" in cfg else None
  if family not in presets.FAMILIES:
    raise ConfigError(f"config key 'model.type' must be one of "
                      f"{sorted(presets.FAMILIES)}, got {family!r}. "
                      "Start from a preset, e.g. jaxtune.models.presets.qwen3_8b(), or "
                      "jaxtune.models.presets.from_hf(<HF directory>).")
  base.model = presets.FAMILIES[family].defaults()
  if "text" in base.model:  # a VLM's text model: checked against its own family's fields
    text_type = cfg.model.get("text", {}).get("type")
    if text_type not in presets.FAMILIES or "text" in presets.FAMILIES[text_type].defaults():
      raise ConfigError(f"config key 'model.text.type' must name a text model family, got "
                        f"{text_type!r}")
    base.model.text = presets.FAMILIES[text_type].defaults()
  _check_keys_and_types(cfg, base, "")

  cfg = ConfigDict(cfg.to_dict())  # a copy: resolving aliases must not edit the caller's dict
  if cfg.data.pack_level == "expand_soft":
    cfg.data.pack_level = "soft"
  for path, allowed in _CHOICES.items():
    if _get(cfg, path) not in allowed:
      raise ConfigError(f"config key '{path}' must be one of {list(allowed)}, "
                        f"got {_get(cfg, path)!r}")

  for key in ("epoch_num", "total_steps"):
    if cfg[key] == 0:  # flags cannot pass None: 0 unsets a key the recipe set
      cfg[key] = None
  if (cfg.epoch_num is None) == (cfg.total_steps is None):
    raise ConfigError("set exactly one of 'epoch_num' and 'total_steps' (got "
                      f"epoch_num={cfg.epoch_num}, total_steps={cfg.total_steps}), e.g. "
                      "--config.total_steps=100 --config.epoch_num=0 (0 unsets a key)")
  for key in ("epoch_num", "total_steps", "global_batch_size"):
    if cfg[key] is not None and cfg[key] <= 0:
      raise ConfigError(f"config key '{key}' must be positive, got {cfg[key]}")
  if cfg.data.cache_max_gib is not None and cfg.data.cache_max_gib <= 0:
    raise ConfigError(f"data.cache_max_gib must be positive or None (no limit), got "
                      f"{cfg.data.cache_max_gib}")
  if cfg.data.sample_max_length > cfg.data.pack_max_length:
    raise ConfigError(f"data.sample_max_length ({cfg.data.sample_max_length}) must be <= "
                      f"data.pack_max_length ({cfg.data.pack_max_length}): a sample must fit in "
                      "one packed row. Lower sample_max_length or raise pack_max_length.")
  if cfg.loss.chunk_size <= 0:
    raise ConfigError(f"loss.chunk_size must be positive, got {cfg.loss.chunk_size}")
  if cfg.optim.lr < 0:
    raise ConfigError(f"optim.lr must be >= 0 (0 trains nothing: evaluation-only runs, parity "
                      f"checks), got {cfg.optim.lr}")
  if cfg.lr.warmup_ratio < 0:
    raise ConfigError(f"lr.warmup_ratio must be >= 0 (< 1: a fraction of the steps, >= 1: a step "
                      f"count), got {cfg.lr.warmup_ratio}")
  if cfg.optim.skip_grad_norm_threshold is not None and cfg.optim.skip_grad_norm_threshold <= 0:
    raise ConfigError(f"optim.skip_grad_norm_threshold must be positive or None, got "
                      f"{cfg.optim.skip_grad_norm_threshold}")
  _check_attention_heads(cfg.model, "model")
  _check_rope_scaling(cfg.model, "model")
  _check_lora(cfg, files)
  axis_rules(cfg)  # a bad override fails here, naming its entry

  if files and not cfg.data.datasets:
    raise ConfigError("data.datasets is empty: add at least one "
                      "jaxtune.config.dataset(name=..., anno_path=...) to the recipe.")
  ds_keys = set(dataset("", "").keys())
  listed = [(f"data.datasets[{i}]", ds) for i, ds in enumerate(cfg.data.datasets)]
  listed += [(f"eval_datasets[{i}]", ds) for i, ds in enumerate(cfg.eval_datasets)]
  for where, ds in listed:
    unknown = set(ds) - ds_keys
    if unknown or "anno_path" not in ds:
      raise ConfigError(f"{where} has unknown keys {sorted(unknown)} or no 'anno_path'; "
                        f"allowed keys: {sorted(ds_keys)}")
    if files and not os.path.exists(ds["anno_path"]):
      raise ConfigError(f"{where}.anno_path '{ds['anno_path']}' does not exist. Point it at a "
                        ".jsonl file or a folder of them.")
    if ds.get("sample_ratio", 1.0) <= 0:
      raise ConfigError(f"{where}.sample_ratio must be positive, got {ds['sample_ratio']}")
    if ds.get("chat_template", "qwen3") not in templates.TEMPLATES:
      raise ConfigError(f"{where}.chat_template must be one of {sorted(templates.TEMPLATES)}, "
                        f"got {ds['chat_template']!r}")
    if not isinstance(ds.get("allow_outside_media_root", False), bool):
      raise ConfigError(f"{where}.allow_outside_media_root must be True or False, got "
                        f"{ds['allow_outside_media_root']!r}")

  _check_run_keys(cfg, files)
  _check_observability(cfg.observability)

  if cfg.load_from is not None:
    checkpoint = _model_of_checkpoint(cfg.load_from)  # read once
    _recipe_rope_scaling_over(cfg.model, checkpoint)
    if cfg.model_from_checkpoint:
      _take_model_from_checkpoint(cfg, checkpoint)
    _check_against_hf_config(cfg, checkpoint)
  if files:
    _check_tokenizer_path(cfg)
  if num_devices is not None:
    _batch_split(cfg, num_devices)
    _check_sequence_split(cfg, num_devices)
  if files:
    _check_work_dir(cfg)
  return cfg


def _check_sequence_split(cfg: ConfigDict, num_devices: int) -> None:
  """mesh.sequence splits every packed row into equal token slices."""
  sequence = mesh_shape(cfg, num_devices)["sequence"]
  if cfg.data.pack_max_length % sequence:
    raise ConfigError(f"data.pack_max_length ({cfg.data.pack_max_length}) must be a multiple of "
                      f"mesh.sequence ({sequence}): each packed row's tokens are split evenly "
                      f"over the sequence axis.")


def _check_lora(cfg: ConfigDict, files: bool = True) -> None:
  """The `lora` section's values; with rank > 0 its targets must choose a linear layer, and
  the PEFT adapter of `lora.init_from` (files=True) must describe the same adapters."""
  try:
    lora.check_config(cfg.lora)
    if lora.enabled(cfg.lora):
      from jaxtune import models  # pylint: disable=import-outside-toplevel  (loads the family)
      from jaxtune.hf import peft  # pylint: disable=import-outside-toplevel
      family = models.family(cfg.model.type)
      targets = lora.check_targets(family, cfg.model, tuple(cfg.lora.targets))
      lora.check_dropout(targets, cfg.lora)
      if files and cfg.lora.init_from:  # r, lora_alpha and target_modules against the recipe
        peft.check_adapter_config(cfg.lora.init_from, family.hf_weight_map(cfg.model), targets,
                                  rank=cfg.lora.rank, alpha=cfg.lora.alpha)
  except ValueError as e:
    raise ConfigError(f"config key {e}") from None


def _check_tokenizer_path(cfg: ConfigDict) -> None:
  if cfg.tokenizer_path is None:
    raise ConfigError("tokenizer_path is not set: point it at the checkpoint's tokenizer "
                      "directory (usually the same as load_from).")
  if not os.path.isdir(cfg.tokenizer_path):
    raise ConfigError(f"tokenizer_path '{cfg.tokenizer_path}' is not a directory.")
  try:
    tokenizer_files.detect_layout(cfg.tokenizer_path)
  except tokenizer_files.TokenizerFilesError as e:
    raise ConfigError(f"tokenizer_path: {e}") from None


def _batch_split(cfg: ConfigDict, num_devices: int) -> tuple[dict[str, int], int, int]:
  """(mesh shape, data-parallel size, micro-batches per step) on `num_devices`: the only place
  they are computed. The global batch must split into whole micro-batches on every rank."""
  shape, dp = mesh_shape(cfg, num_devices), data_parallel_size(cfg, num_devices)
  rows_per_pass = dp * cfg.data.micro_batch_size
  if cfg.global_batch_size % rows_per_pass:
    raise ConfigError(f"global_batch_size ({cfg.global_batch_size}) must be a multiple of "
                      f"data-parallel size x data.micro_batch_size ({dp} x "
                      f"{cfg.data.micro_batch_size} = {rows_per_pass}).")
  return shape, dp, cfg.global_batch_size // rows_per_pass


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A validated recipe with every value derived from it and the devices, computed once.

  `cfg` stays the recipe itself (what config.json and the checkpoints hold, JSON-serialisable);
  what is derived lives beside it. jaxtune.train.build makes a run from this."""
  cfg: ConfigDict               # the validated recipe
  num_devices: int
  backend: str                  # the JAX backend the run compiles for
  mesh_shape: dict[str, int]    # mesh axis sizes, the -1 resolved
  axis_rules: sharding.Rules    # the logical-axis rules, overrides applied
  data_parallel: int            # ranks that see different rows
  num_micro: int                # micro-batches per optimizer step (gradient accumulation)
  attention: str                # what attention='auto' runs here (ops.attention.resolve_impl)
  media: MediaSpec | None       # how images enter the batches; None for a text model
  tiles_bound: int              # image tile slots per packed row (0: no pixels)

  @property
  def model_kwargs(self) -> dict:
    """The keyword arguments of models.create_model / abstract_model for this recipe."""
    cfg = self.cfg
    return dict(param_dtype=jnp.dtype(cfg.param_dtype),
                compute_dtype=jnp.dtype(cfg.compute_dtype), remat=cfg.remat,
                attention=cfg.attention, seed=cfg.seed,
                lora=cfg.lora if lora.enabled(cfg.lora) else None)


def resolve(cfg: ConfigDict, num_devices: int, *, backend: str | None = None,
            files: bool = True) -> Resolved:
  """`validate` the recipe for `num_devices` devices of `backend` (default: JAX's) and derive
  what a run needs from it (see `Resolved`). files=False: as `validate`'s."""
  from jaxtune import models  # pylint: disable=import-outside-toplevel  (loads the family)
  cfg = validate(cfg, num_devices, files=files)
  if backend is None:
    import jax  # pylint: disable=import-outside-toplevel
    backend = jax.default_backend()
  shape, dp, num_micro = _batch_split(cfg, num_devices)
  media = models.family(cfg.model.type).media(cfg.model)
  try:
    tiles = tiles_bound(cfg.data, media)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return Resolved(cfg=cfg, num_devices=int(num_devices), backend=backend, mesh_shape=shape,
                  axis_rules=axis_rules(cfg), data_parallel=dp, num_micro=num_micro,
                  attention=attention.resolve_impl(cfg.attention, backend, cfg.compute_dtype),
                  media=media, tiles_bound=tiles)


_WORK_DIR_FIX = ("Point work_dir at a writable directory (it is created at the start if missing), "
                 "e.g. --config.work_dir=/path/to/runs")


def _write_probe(directory: str) -> None:
  """Creates and removes an empty file in `directory`; raises the OSError a write there gets.
  os.access is no test as root (it says yes on a read-only file system too)."""
  fd, path = tempfile.mkstemp(prefix=".jaxtune-write-check-", dir=directory)
  try:
    os.close(fd)
  finally:
    os.remove(path)


def checkpoint_bytes_estimate(cfg: ConfigDict) -> int | None:
  """About the bytes of one checkpoint (jaxtune.train.checkpoint: the parameters and Adam's
  state): every parameter in param_dtype plus its two moments in optim.state_dtype. Frozen
  parameters are counted with moments too, so this errs high. None if the model cannot be
  sized."""
  from jaxtune import models  # pylint: disable=import-outside-toplevel
  try:
    count = models.param_count(cfg.model)
  except Exception as e:  # pylint: disable=broad-except  (only a warning depends on it)
    log.debug("work_dir free-space check skipped: the model could not be sized (%s)", e)
    return None
  param = jnp.dtype(cfg.get("param_dtype", "float32")).itemsize
  moment = jnp.dtype(cfg.optim.get("state_dtype", "float32")).itemsize
  return count * (param + 2 * moment)


def _check_work_dir(cfg: ConfigDict) -> None:
  """work_dir is a directory that can be written, or can be created: its nearest existing
  parent is a writable directory. Nothing is created here (the run directory is made at the
  start, jaxtune.train.rundir); the write test creates and removes one empty file in that
  nearest existing directory. Less free space there than one checkpoint is a warning."""
  raw = cfg.work_dir
  if not isinstance(raw, str) or not raw.strip():
    raise ConfigError(f"work_dir must name a directory, got {raw!r}. {_WORK_DIR_FIX}.")
  path = os.path.abspath(raw)
  shown = f"work_dir '{raw}'" + (f" ({path})" if path != raw else "")
  existing = path
  while not os.path.lexists(existing):   # "/" exists: the loop ends
    existing = os.path.dirname(existing)
  missing = existing != path
  if not os.path.isdir(existing):
    if os.path.islink(existing):
      what = f"is a symbolic link to '{os.readlink(existing)}', which does not exist"
    elif os.path.isfile(existing):
      what = "is a file, not a directory"
    else:
      what = "is not a directory"
    if missing:
      raise ConfigError(f"{shown} cannot be created: '{existing}' {what}. {_WORK_DIR_FIX}.")
    raise ConfigError(f"{shown} {what}; runs are written to directories below work_dir. "
                      f"{_WORK_DIR_FIX}, or move it away.")
  if not missing and not os.access(existing, os.R_OK | os.X_OK):
    raise ConfigError(f"{shown} cannot be read (permission denied): runs are looked up there "
                      f"(auto_resume). Fix its permissions, or: {_WORK_DIR_FIX}.")
  try:
    _write_probe(existing)
  except OSError as e:
    if e.errno == errno.EROFS:
      why = "is on a read-only file system"
    elif e.errno in (errno.EACCES, errno.EPERM):
      why = "is not writable (permission denied)"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
      why = "is on a full disk (or over its quota)"
    else:
      why = f"cannot be written ({type(e).__name__}: {e})"
    subject = (f"{shown} does not exist and cannot be created: its nearest existing parent "
               f"'{existing}'" if missing else shown)
    raise ConfigError(f"{subject} {why}. {_WORK_DIR_FIX}.") from None
  try:
    free = shutil.disk_usage(existing).free
  except OSError:
    return
  need = checkpoint_bytes_estimate(cfg)
  if need is not None and free < need:
    log.warning("work_dir '%s': %.2f GiB free on its file system, less than one checkpoint "
                "(about %.2f GiB: the parameters in %s and Adam's two moments in %s); saving "
                "a checkpoint will fail for lack of space. Free some space or point work_dir "
                "at a larger disk.", raw, free / 2**30, need / 2**30,
                cfg.get("param_dtype", "float32"), cfg.optim.get("state_dtype", "float32"))


def _check_run_keys(cfg: ConfigDict, files: bool) -> None:
  """Checkpoint / export / eval schedules, resume options, the profiler window."""
  for key in ("checkpoint_interval", "hf_interval", "eval_interval"):
    if cfg[key] != -1 and cfg[key] <= 0:
      raise ConfigError(f"config key '{key}' must be a positive step count or -1 (only at the "
                        f"end), got {cfg[key]}")
  if cfg.max_consecutive_nonfinite < 1:
    raise ConfigError("config key 'max_consecutive_nonfinite' must be >= 1, got "
                      f"{cfg.max_consecutive_nonfinite}")
  names = [ds.get("name") for ds in cfg.eval_datasets]
  if len(set(names)) != len(names) or not all(names):
    raise ConfigError(f"eval_datasets need distinct, non-empty names (they become "
                      f"eval_loss_<name>), got {names}")
  steps = tuple(cfg.profile_steps)
  if steps and (len(steps) != 2 or not all(isinstance(s, int) for s in steps)
                or not 1 <= steps[0] <= steps[1]):
    raise ConfigError(f"config key 'profile_steps' must be () or (first, last) with "
                      f"1 <= first <= last, got {cfg.profile_steps!r}, e.g. "
                      "--config.profile_steps=(5,7)")
  if not files:
    return
  if cfg.load_weights_only and not cfg.resume_from:
    raise ConfigError("load_weights_only=True needs resume_from=<checkpoint> (the weights to "
                      "load); to start from HF weights use load_from instead.")
  if cfg.resume_from and not os.path.exists(cfg.resume_from):
    raise ConfigError(f"resume_from '{cfg.resume_from}' does not exist. Point it at a "
                      "checkpoint (<run>/checkpoints/<step>), a checkpoints directory or a run "
                      "directory.")


_WANDB_MODES = ("online", "offline", "disabled")


def _check_observability(obs: ConfigDict) -> None:
  """The W&B keys: a project name, a known mode, string tags, and wandb importable."""
  if obs.wandb_project is None:
    return
  if not obs.wandb_project.strip():
    raise ConfigError("observability.wandb_project must be a W&B project name or None (off), "
                      "got ''")
  if obs.wandb_mode is not None and obs.wandb_mode not in _WANDB_MODES:
    raise ConfigError(f"observability.wandb_mode must be None (W&B's default, WANDB_MODE) or "
                      f"one of {list(_WANDB_MODES)}, got {obs.wandb_mode!r}")
  if not all(isinstance(tag, str) for tag in obs.wandb_tags):
    raise ConfigError(f"observability.wandb_tags must be strings, got {obs.wandb_tags!r}")
  if importlib.util.find_spec("wandb") is None:
    raise ConfigError("observability.wandb_project is set but wandb is not installed: "
                      "pip install jaxtune[wandb]")


def _check_attention_heads(section: ConfigDict, where: str) -> None:
  """Query heads must be a multiple of kv heads, in every (nested) attention config."""
  for key, value in section.items():
    if isinstance(value, ConfigDict):
      _check_attention_heads(value, f"{where}.{key}")
  if "num_attention_heads" in section and "num_key_value_heads" in section:
    heads, kv_heads = section.num_attention_heads, section.num_key_value_heads
    if kv_heads <= 0 or heads % kv_heads:
      raise ConfigError(f"{where}.num_attention_heads ({heads}) must be a multiple of "
                        f"{where}.num_key_value_heads ({kv_heads})")


def _check_rope_scaling(section: ConfigDict, where: str) -> None:
  """Every (nested) `rope_scaling` is None or a yarn dict; each is rewritten in its one form
  (jaxtune.ops.rope.normalize_rope_scaling: HF's legacy "type" read as rope_type, floats)."""
  for key, value in section.items():
    if key != "rope_scaling" and isinstance(value, ConfigDict):
      _check_rope_scaling(value, f"{where}.{key}")
  if "rope_scaling" not in section:
    return
  value = section.rope_scaling
  try:
    scaling = normalize_rope_scaling(value.to_dict() if isinstance(value, ConfigDict) else value)
  except ValueError as e:
    raise ConfigError(f"config key '{where}.rope_scaling': {e}. Set it to None or e.g. "
                      "dict(rope_type='yarn', factor=4.0, "
                      "original_max_position_embeddings=32768).") from None
  section.rope_scaling = scaling


def _recipe_rope_scaling_over(recipe: ConfigDict, checkpoint: ConfigDict) -> None:
  """A `rope_scaling` the recipe sets (not None) wins over load_from's config.json: YaRN is how
  a run extends a checkpoint's context (Qwen3: factor 4 over 32,768 positions), and the export
  writes it. None takes config.json's (model_from_checkpoint) or must match it."""
  if recipe.get("type") != checkpoint.get("type"):
    return
  for key, value in recipe.items():
    if key not in checkpoint:
      continue
    if key == "rope_scaling":
      if value is not None:
        checkpoint.rope_scaling = value.to_dict() if isinstance(value, ConfigDict) else value
    elif isinstance(value, ConfigDict) and isinstance(checkpoint[key], ConfigDict):
      _recipe_rope_scaling_over(value, checkpoint[key])


def _differences(recipe: ConfigDict, checkpoint: ConfigDict, where: str,
                 skip: tuple[str, ...]) -> list[str]:
  """Every field, nested ones too, whose value differs; lists and tuples compare alike."""
  out = []
  for key in sorted(set(recipe.keys()) | set(checkpoint.keys())):
    path = f"{where}.{key}"
    if key in skip:
      continue
    mine, theirs = recipe.get(key), checkpoint.get(key)
    if isinstance(mine, ConfigDict) and isinstance(theirs, ConfigDict):
      out += _differences(mine, theirs, path, skip)
      continue
    as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
    if as_tuple(mine) != as_tuple(theirs):
      out.append(f"{path}: recipe {mine!r} vs config.json {theirs!r}")
  return out


def _model_of_checkpoint(load_from: str) -> ConfigDict:
  """The `model` section of load_from's config.json."""
  try:
    return presets.from_hf(load_from)
  except (OSError, ValueError) as e:
    raise ConfigError(f"load_from '{load_from}': {e}") from None


def _take_model_from_checkpoint(cfg: ConfigDict, checkpoint: ConfigDict) -> None:
  """model_from_checkpoint: the architecture and tokenizer of load_from, the recipe's training
  choices (the family's recipe_only fields, e.g. freeze_vision)."""
  if checkpoint.type == cfg.model.type:
    _copy_fields(cfg.model, checkpoint, presets.FAMILIES[checkpoint.type].recipe_only)
  cfg.model = checkpoint
  cfg.tokenizer_path = cfg.load_from


def _copy_fields(source: ConfigDict, target: ConfigDict, names: tuple[str, ...]) -> None:
  """`names` (at any depth) from source into target, where both have them."""
  for key, value in source.items():
    if key not in target:
      continue
    if isinstance(value, ConfigDict) and isinstance(target[key], ConfigDict):
      _copy_fields(value, target[key], names)
    elif key in names:
      target[key] = value


def _check_against_hf_config(cfg: ConfigDict, checkpoint: ConfigDict) -> None:
  """`load_from`'s config.json is the truth for the architecture; a mismatch is an error."""
  path = os.path.join(cfg.load_from, "config.json")
  skip = presets.FAMILIES[checkpoint.type].recipe_only
  mismatched = _differences(cfg.model, checkpoint, "model", skip)
  if mismatched:
    raise ConfigError(f"the recipe's model does not match {path}:\n  " + "\n  ".join(mismatched)
                      + "\nUse `model = presets.from_hf(load_from)`, the preset matching the "
                      "checkpoint, or fix the overrides.")


def to_json(cfg: ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
