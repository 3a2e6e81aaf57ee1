"""Benchmarks the text data pipeline on this machine; prints one JSON object.

  python scripts/bench_data.py [--samples 100000] [--workers 0] [--repeat 5] [--out bench.json]

Measures, on synthetic but realistic chats (1-3 exchanges with log-normal lengths, a system
prompt in 30%; ~546 tokens per sample on average, like XTuner's measurement set) and the real
Qwen3 tokenizer:
  - tokenizer_alone: the fast encoder on the rendered pieces of every sample, one call per
    piece as XTuner encodes them (same worker count, warm workers, text already in memory);
  - tiktoken_on_message_texts: the same on the bare message texts (no template text): the
    floor for a pipeline that splices the template's constant ids instead of encoding them;
  - hf_tokenizer_alone: the HF fast tokenizer's encode_batch on the same texts (reference);
  - end_to_end: SFTData start-up (read, parse, template, tokenize, truncate, soft-pack) plus
    iterating every batch of one epoch, in tokens/s. Like the trainer, it hands SFTData a
    loaded tokenizer (the baseline gets one too); loading it is timed on its own;
  - cold vs cached start with data.cache_dir;
  - soft-pack efficiency at pack_max_length 16384.

  python scripts/bench_data.py --balance [--data_parallel 8 --accum 8 --pack 16384]
per-rank attention FLOPs of every micro-batch of an epoch, with and without group_by_length.

  python scripts/bench_data.py --scale [--files 2000 --lines_per_file 100]
a folder of many JSONL files (cut from the same corpus): start-up time, peak anonymous memory
above the memory-mapped ids, open descriptors, cold (tokenize + write the cache) and cached,
each start in a fresh process.

  python scripts/bench_data.py --long [--samples 20000 --repeat 3]
end-to-end tokens/s with 131,072-token rows against 16,384-token ones (long context), on the
plain chats and on long chats (10 to 240 of them joined: about 5k to 130k tokens each).

  python scripts/bench_data.py --science [--samples 20000 --repeat 3]
Intern-S1's scientific tokenizer (an official-layout directory built offline as the tests build
it): end-to-end tokens/s on the same chats with ~5% of their characters SMILES / protein /
IUPAC (tagged and untagged), against the plain chats with the Qwen3 tokenizer.json, with the
SMILES check the official code would use here (RDKit when it imports) and with the rule-based
one; also the plain chats through the Intern-S1 tokenizer (auto-detection on ordinary text).

  python scripts/bench_data.py --images [--n_images 64 --repeat 5]
Intern-S1 image loading on one core, over generated JPEGs of mixed aspect ratios:
what batches carry, load_tiles(normalized=False) (decode, EXIF, RGB, tile with the thumbnail,
uint8; the model normalises on the device), against the floor of Pillow decode plus the one
bicubic resize to the image's grid, best of `repeat` rounds; also the float32-normalised tiles
and the floor with the thumbnail's second resize.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ml_collections import ConfigDict  # pylint: disable=wrong-import-position

from jaxtune.config import base_config, dataset  # pylint: disable=wrong-import-position
from jaxtune.data import encoding, images, sources, templates  # pylint: disable=wrong-import-position
from jaxtune.data.pipeline import SFTData  # pylint: disable=wrong-import-position
from jaxtune.data.encoders import open_encoder  # pylint: disable=wrong-import-position
from jaxtune.data.tokenizer import (TokenEncoder, build_qwen_tokenizer,  # pylint: disable=wrong-import-position
                                    load_tokenizer)

WORDS = ("the of and to in is that for it as with was on be by at this are from or have an "
         "they which one you had not but what all were when we there can been has more if "
         "will would who so no model data training value function return result example "
         "because between system through during without number people water during world "
         "information important different following however another question answer simple "
         "Python JSON token gradient learning rate batch sequence attention layer").split()
PUNCT = [".", ",", "?", "!", ":", ";"]


def _text(rng: np.random.Generator, n_words: int) -> str:
  words = rng.choice(WORDS, size=n_words)
  out = []
  for k, w in enumerate(words):
    out.append(w)
    r = rng.random()
    if r < 0.08:
      out.append(PUNCT[int(rng.integers(len(PUNCT)))])
    elif r < 0.1:
      out.append(str(int(rng.integers(0, 10000))))
    elif r < 0.11:
      out.append("\n\n")
  text = " ".join(out)
  if rng.random() < 0.1:
    text += "\n```python\ndef f(x):\n    return x * 2 + 1\n```\n"
  return text


# Scientific snippets for --science: untagged molecules (mostly distinct, so each is checked)
# and proteins (auto-detected), tagged SMILES / IUPAC / FASTA.
SUBSTITUENTS = ("O", "N", "Cl", "Br", "F", "C(=O)O", "OC", "C#N", "C(F)(F)F", "S(=O)(=O)N")
AMINO = "ACDEFGHIKLMNPQRSTVWY"
TAGGED = ("<SMILES>OC[C@H]1OC(O)[C@H](O)[C@@H](O)[C@@H]1O</SMILES>",
          "<IUPAC>2-acetyloxybenzoic acid</IUPAC>", "<IUPAC>1,3,7-trimethylpurine-2,6-dione</IUPAC>",
          "<FASTA>MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMF</FASTA>")


def _science(rng: np.random.Generator) -> str:
  kind = rng.random()
  if kind < 0.5:   # an amide of a substituted benzene: chain lengths and groups vary
    a, b = rng.integers(1, 13, size=2)
    x, y = rng.choice(SUBSTITUENTS, size=2)
    return f"{'C' * a}C(=O)N{'C' * b}c1ccc({x})c({y})c1"
  if kind < 0.7:
    return "".join(rng.choice(list(AMINO), size=int(rng.integers(30, 80))))
  return TAGGED[int(rng.integers(len(TAGGED)))]


def _with_science(rng: np.random.Generator, text: str, rate: float = 0.007) -> str:
  """`text` with a scientific snippet after ~`rate` of its words (~5% of the characters)."""
  words = text.split(" ")
  at = np.flatnonzero(rng.random(len(words)) < rate)
  for k in at[::-1]:
    words.insert(int(k) + 1, _science(rng))
  return " ".join(words)


def make_corpus(path: str, samples: int, seed: int = 0, science: bool = False) -> None:
  rng = np.random.default_rng(seed)
  # The snippets draw from their own generator: the chats are the plain corpus's, word for word.
  sci_rng = np.random.default_rng(seed + 1)
  text = (lambda r, n: _with_science(sci_rng, _text(r, n))) if science else _text
  with open(path, "w", encoding="utf-8") as f:
    for i in range(samples):
      msgs = []
      if rng.random() < 0.3:
        msgs.append({"role": "system", "content": text(rng, int(rng.integers(5, 40)))})
      for _ in range(int(rng.integers(1, 4))):
        msgs.append({"role": "user", "content": text(rng, int(rng.lognormal(3.6, 0.9)) + 3)})
        msgs.append({"role": "assistant",
                     "content": text(rng, int(rng.lognormal(4.72, 0.8)) + 3)})
      f.write(json.dumps({"id": i, "messages": msgs}) + "\n")


def _message_texts(path: str) -> tuple[list[list[str]], list[list[str]]]:
  """Per sample, the rendered pieces (what the chat template makes the model see, each piece
  encoded on its own) and the bare message texts (the pieces without their template text)."""
  tpl = templates.get_template("qwen3")
  pieces, texts = [], []
  with open(path, "rb") as f:
    for line in f:
      messages, tools = sources.parse_sample(json.loads(line), sources.ParseOptions())
      pieces.append([p.text for p in templates.render(messages, tpl, tools)])
      texts.append([m.text for m in messages])
  return pieces, texts


def _encode_pieces(chunk: list[list[str]]) -> int:
  """Raw tiktoken calls (no memo), one per piece: the tokenizer alone."""
  enc = encoding._WORKER_ENCODER  # pylint: disable=protected-access
  return sum(len(enc._encode_bytes(p)) for pieces in chunk for p in pieces) // 4  # pylint: disable=protected-access


def tokenizer_alone(tok_dir: str, pieces: list[list[str]], workers: int) -> dict:
  import concurrent.futures as cf  # pylint: disable=import-outside-toplevel
  import multiprocessing  # pylint: disable=import-outside-toplevel
  enc = TokenEncoder(tok_dir)
  chunks = [pieces[i:i + 2000] for i in range(0, len(pieces), 2000)]
  ctx = multiprocessing.get_context("spawn")
  with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=encoding._init_worker,  # pylint: disable=protected-access
                              initargs=(enc,)) as pool:
    list(pool.map(_encode_pieces, chunks[:workers]))   # warm the workers up
    cpu0 = _cpu_seconds() + _worker_cpu(pool)   # the workers' start-up is left out
    t0 = time.perf_counter()
    tokens = sum(pool.map(_encode_pieces, chunks))
    secs = time.perf_counter() - t0
  cpu = _cpu_seconds() - cpu0
  return dict(tokens=tokens, seconds=round(secs, 3), tokens_per_sec=round(tokens / secs),
              cpu_seconds=round(cpu, 3))


def _cpu_seconds() -> float:
  """CPU time of this process and of its children that have exited."""
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
      resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _worker_cpu(pool) -> float:
  """CPU the pool's live workers have used so far (from /proc; Linux)."""
  total = 0.0
  for pid in list(pool._processes):  # pylint: disable=protected-access
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  return total


def hf_alone(tok_dir: str, pieces: list[list[str]], limit: int = 20000) -> dict:
  hf = load_tokenizer(tok_dir)
  flat = [p for ps in pieces[:limit] for p in ps]
  t0 = time.perf_counter()
  ids = hf(flat, add_special_tokens=False)["input_ids"]
  secs = time.perf_counter() - t0
  tokens = sum(len(x) for x in ids)
  return dict(samples=min(limit, len(pieces)), tokens=tokens, seconds=round(secs, 3),
              tokens_per_sec=round(tokens / secs))


def end_to_end(tok_dir: str, path: str, workers: int, cache_dir: str | None,
               pack_len: int = 16384, **encoder_kwargs) -> dict:
  cfg = ConfigDict(base_config().data.to_dict() | dict(
      datasets=[dataset("bench", path)], sample_max_length=pack_len,
                        pack_max_length=pack_len, pack_level="soft", num_workers=workers,
                        cache_dir=cache_dir, seed=42))
  t0 = time.perf_counter()
  encoder = open_encoder(tok_dir, **encoder_kwargs)   # as the trainer does, once per run
  load = time.perf_counter() - t0
  cpu0 = _cpu_seconds()
  t0 = time.perf_counter()
  data = SFTData(cfg, encoder, global_batch_size=8)
  start = time.perf_counter() - t0
  t1 = time.perf_counter()
  rows = 0
  for batch in data.batches(0):
    rows += batch["input_ids"].shape[0]
  iterate = time.perf_counter() - t1
  for thread in threading.enumerate():   # workers exit in the background: count their CPU
    if thread.name == "jaxtune-encoder-pool-close":
      thread.join()
  cpu = _cpu_seconds() - cpu0
  tokens = data.stats["datasets"]["bench"]["tokens"]
  return dict(start_seconds=round(start, 3), iterate_seconds=round(iterate, 3),
              seconds=round(start + iterate, 3), cpu_seconds=round(cpu, 3),
              tokenizer_load_seconds=round(load, 3),
              startup_breakdown=data.stats["startup_seconds"],
              tokens=tokens, tokens_per_sec=round(tokens / (start + iterate)),
              packs=data.stats["packs"], pack_efficiency=round(data.stats["pack_efficiency"], 4),
              loss_token_fraction=round(data.stats["datasets"]["bench"]["loss_tokens"] / tokens,
                                        3),
              steps_per_epoch=data.steps_per_epoch, rows_iterated=rows,
              cache_hits=data.cache.hits, cache_misses=data.cache.misses)


# ---------------------------------------------------------------- --balance (group_by_length)
def balance(tok_dir: str, path: str, workers: int, cache_dir: str, data_parallel: int,
            accum: int, pack_len: int) -> dict:
  """Per-rank attention FLOPs (sum of squared segment lengths) of every micro-batch of one
  epoch on a simulated data=`data_parallel` mesh with `accum` micro-batches per step, with and
  without data.group_by_length. The rows of rank r in micro-batch m are the trainer's
  (jaxtune.train.step.split_micro_batches: rows k * accum + m, rank k)."""
  out = dict(data_parallel=data_parallel, micro_batches_per_step=accum,
             global_batch_size=data_parallel * accum, pack_max_length=pack_len)
  encoder = TokenEncoder(tok_dir)
  for grouped in (False, True):
    cfg = ConfigDict(base_config().data.to_dict() | dict(
        datasets=[dataset("bench", path)], sample_max_length=pack_len,
                          pack_max_length=pack_len, pack_level="soft", num_workers=workers,
                          cache_dir=cache_dir, seed=42, group_by_length=grouped))
    data = SFTData(cfg, encoder, global_batch_size=data_parallel * accum,
                   data_parallel=data_parallel)
    flops = data.pack_flops[data.epoch_order(0)]                  # [steps * rows], row order
    per = flops.reshape(-1, data_parallel, accum).transpose(0, 2, 1).reshape(-1, data_parallel)
    mean, top = per.mean(1), per.max(1)
    out["grouped" if grouped else "plain"] = dict(
        packs=data.plan.num_packs, steps=data.steps_per_epoch, micro_batches=len(per),
        # how much longer the slowest rank works than the average one, per micro-batch
        max_over_mean=round(float(np.mean(top / mean)), 4),
        spread_over_mean=round(float(np.mean((top - per.min(1)) / mean)), 4),
        # attention time with every micro-batch waiting for its slowest rank vs. perfect balance
        attention_efficiency=round(float(mean.sum() / top.sum()), 4))
  return out


# ---------------------------------------------------------------- --scale (many files)
def make_folder(src: str, root: str, files: int, lines_per_file: int) -> None:
  """`files` JSONL files of `lines_per_file` chats each, cut from the bench corpus in turn
  (every file's content differs, so each has its own cache entry)."""
  with open(src, "rb") as f:
    lines = f.read().splitlines()
  os.makedirs(root, exist_ok=True)
  at = 0
  for k in range(files):
    with open(os.path.join(root, f"part-{k:05d}.jsonl"), "wb") as out:
      for _ in range(lines_per_file):
        out.write(lines[at % len(lines)] + b"\n")
        at += 1
      at += k % 7          # shift the window so that no two files are equal


_SCALE_CHILD = r"""
import json, os, resource, sys, threading, time
sys.path.insert(0, sys.argv[1])
from ml_collections import ConfigDict
from jaxtune.config import base_config, dataset
from jaxtune.data.pipeline import SFTData
from jaxtune.data.tokenizer import TokenEncoder
tok_dir, root, cache_dir, workers, pack_len = sys.argv[2:7]
def status(key):
  for line in open("/proc/self/status"):
    if line.startswith(key + ":"):
      return int(line.split()[1]) * 1024
peak = {"anon": 0}
stop = threading.Event()
def watch():
  while not stop.is_set():
    peak["anon"] = max(peak["anon"], status("RssAnon"))
    time.sleep(0.05)
encoder = TokenEncoder(tok_dir)
fds0, anon0 = len(os.listdir("/proc/self/fd")), status("RssAnon")
threading.Thread(target=watch, daemon=True).start()
t0 = time.perf_counter()
cfg = ConfigDict(base_config().data.to_dict() | dict(
    datasets=[dataset("scale", root)], sample_max_length=int(pack_len),
                      pack_max_length=int(pack_len), pack_level="soft",
                      num_workers=int(workers), cache_dir=cache_dir, seed=42))
data = SFTData(cfg, encoder, global_batch_size=8)
start = time.perf_counter() - t0
fds = len(os.listdir("/proc/self/fd"))
t1 = time.perf_counter()
it = data.batches(0)
for _ in range(min(50, data.steps_per_epoch)):
  next(it)
iterate = time.perf_counter() - t1
stop.set()
print(json.dumps(dict(
    start_seconds=round(start, 2), iterate_50_steps_seconds=round(iterate, 2),
    tokens=sum(d["tokens"] for d in data.stats["datasets"].values()),
    samples=sum(d["samples"] for d in data.stats["datasets"].values()),
    files=data.stats["datasets"]["scale"]["files"], packs=data.stats["packs"],
    cache_hits=data.cache.hits, cache_misses=data.cache.misses,
    mapped_id_bytes=4 * len(data._tokens),
    rss_anon_before=anon0, rss_anon_peak=peak["anon"], rss_anon_after=status("RssAnon"),
    rss_file_after=status("RssFile"), vm_hwm=status("VmHWM"),
    rss_above_mapped_ids_peak_gib=round((peak["anon"] - anon0) / 2**30, 3),
    open_fds_before=fds0, open_fds_after_start=fds,
    fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    startup_breakdown=data.stats["startup_seconds"])))
"""


def scale(tok_dir: str, workdir: str, corpus: str, files: int, lines_per_file: int,
          workers: int, pack_len: int) -> dict:
  import subprocess  # pylint: disable=import-outside-toplevel
  root = os.path.join(workdir, f"scale-{files}x{lines_per_file}")
  t0 = time.perf_counter()
  if not os.path.isdir(root):
    make_folder(corpus, root, files, lines_per_file)
  made = time.perf_counter() - t0
  cache_dir = tempfile.mkdtemp(dir=workdir, prefix="scale-cache-")
  repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
  runs = {}
  try:
    for name in ("cold", "cached"):
      # A fresh process per start: its memory and descriptors are the start's alone.
      out = subprocess.run([sys.executable, "-c", _SCALE_CHILD, repo, tok_dir, root, cache_dir,
                            str(workers), str(pack_len)], capture_output=True, text=True,
                           check=True)
      runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    du = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache_dir) for f in fs)
  finally:
    shutil.rmtree(cache_dir, ignore_errors=True)
  jsonl = sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root))
  tokens = runs["cold"]["tokens"]
  return dict(files=files, lines_per_file=lines_per_file, jsonl_gib=round(jsonl / 2**30, 3),
              corpus_seconds=round(made, 1), cache_dir_gib=round(du / 2**30, 3),
              tokens=tokens, cold=runs["cold"], cached=runs["cached"],
              # Linear in tokens (per-sample index arrays): what 2 B tokens would take.
              extrapolated_2b_tokens_rss_above_ids_gib={
                  k: round(runs[k]["rss_above_mapped_ids_peak_gib"] * 2e9 / tokens, 2)
                  for k in runs})


# ---------------------------------------------------------------- --images (Intern-S1 tiles)
IMAGE_SIZES = ((640, 480), (375, 500), (1024, 256), (800, 800))


def make_images(root: str, n: int, seed: int = 0) -> list[tuple[str, tuple[int, int]]]:
  """`n` JPEGs cycling through IMAGE_SIZES: smooth gradients plus mild noise, about the size
  and decode cost of a photo of that resolution."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(seed)
  out = []
  for k in range(n):
    w, h = IMAGE_SIZES[k % len(IMAGE_SIZES)]
    path = os.path.join(root, f"img-{k:03d}-{w}x{h}.jpg")
    if not os.path.isfile(path):
      y, x = np.mgrid[0:h, 0:w].astype(np.float32)
      phase = rng.uniform(0, 6.3, 3)
      px = np.stack([127 + 100 * np.sin(x / (20 + 9 * c) + y / (31 + 5 * c) + phase[c])
                     for c in range(3)], -1) + rng.normal(0, 12, (h, w, 3))
      Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(path, quality=90)
    out.append((path, (w, h)))
  return out


def _decode_and_resize(path: str, wh: tuple[int, int]) -> None:
  """The floor: what any InternVL pipeline must do (decode, one resize to the grid)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  cols, rows = images.best_grid(wh[0], wh[1])
  with Image.open(path) as im:
    im.load()
    (im if im.mode == "RGB" else im.convert("RGB")).resize(
        (images.TILE * cols, images.TILE * rows), Image.Resampling.BICUBIC)


def _decode_resize_thumbnail(path: str, wh: tuple[int, int]) -> None:
  """The floor of InternVL tiling itself: the thumbnail is a second resize of the original."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  cols, rows = images.best_grid(wh[0], wh[1])
  with Image.open(path) as im:
    im.load()
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    rgb.resize((images.TILE * cols, images.TILE * rows), Image.Resampling.BICUBIC)
    if cols * rows > 1:
      rgb.resize((images.TILE, images.TILE), Image.Resampling.BICUBIC)


def bench_images(workdir: str, n: int, repeat: int) -> dict:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  files = make_images(os.path.join(workdir, f"images-{n}"), n)
  tiles = sum(images.num_tiles(*wh) for _, wh in files)
  variants = {
      "decode_resize_floor": _decode_and_resize,
      "decode_resize_thumbnail_floor": _decode_resize_thumbnail,
      # what batches carry: uint8 tiles, normalised on the accelerator (4x fewer bytes)
      "load_tiles": lambda p, wh: images.load_tiles(p, wh, 1, 1, 12, normalized=False),
      "load_tiles_float32": lambda p, wh: images.load_tiles(p, wh, 1, 1, 12),
  }
  runs = {k: [] for k in variants}
  cpu_runs = {k: [] for k in variants}
  for _ in range(repeat):   # rounds taken in turn: a slow moment of the machine hits all alike
    for name, fn in variants.items():
      c0, t0 = time.process_time(), time.perf_counter()
      for path, wh in files:
        fn(path, wh)
      runs[name].append(time.perf_counter() - t0)
      cpu_runs[name].append(time.process_time() - c0)
  # Where the extra time goes, on one image of each size (best of `repeat`).
  parts = {}
  for path, wh in files[:len(IMAGE_SIZES)]:
    im = images.load_image(path, wh)
    cols, rows = images.best_grid(*wh)
    steps = {
        "decode": lambda: images.load_image(path, wh),
        "grid_resize": lambda: im.resize((448 * cols, 448 * rows), Image.Resampling.BICUBIC),
        "thumbnail_resize": lambda: im.resize((448, 448), Image.Resampling.BICUBIC),
        "tile_image": lambda: images.tile_image(im, 1, 12),
        "normalize": functools.partial(images.normalize, images.tile_image(im, 1, 12)),
    }
    best = {step: min(_timed(fn) for _ in range(3 * repeat)) for step, fn in steps.items()}
    parts[f"{wh[0]}x{wh[1]}"] = dict(grid=[cols, rows], tiles=images.num_tiles(*wh),
                                     ms={k: round(v * 1e3, 2) for k, v in best.items()})
  best = {k: min(v) for k, v in runs.items()}
  cpu = {k: min(v) for k, v in cpu_runs.items()}
  floor, cpu_floor = best["decode_resize_floor"], cpu["decode_resize_floor"]
  return dict(
      images=n, tiles=tiles, sizes=[list(s) for s in IMAGE_SIZES], repeat=repeat, threads=1,
      images_per_sec={k: round(n / v, 1) for k, v in best.items()},
      tiles_per_sec_load_tiles=round(tiles / best["load_tiles"], 1),
      all_seconds={k: [round(x, 3) for x in v] for k, v in runs.items()},
      all_cpu_seconds={k: [round(x, 3) for x in v] for k, v in cpu_runs.items()},
      # a_time / b_time - 1, best of the rounds; CPU time is steadier on a shared machine.
      overhead=round(best["load_tiles"] / floor - 1, 3),
      overhead_cpu=round(cpu["load_tiles"] / cpu_floor - 1, 3),
      overhead_median=round(statistics.median(runs["load_tiles"])
                            / statistics.median(runs["decode_resize_floor"]) - 1, 3),
      overhead_float32_tiles=round(best["load_tiles_float32"] / floor - 1, 3),
      # what the thumbnail (XTuner's algorithm, not this code) costs on its own
      thumbnail_share_cpu=round(cpu["decode_resize_thumbnail_floor"] / cpu_floor - 1, 3),
      overhead_over_thumbnail_floor_cpu=round(
          cpu["load_tiles"] / cpu["decode_resize_thumbnail_floor"] - 1, 3),
      overhead_float32_tiles_cpu=round(cpu["load_tiles_float32"] / cpu_floor - 1, 3),
      per_image_ms=parts)


def _timed(fn) -> float:
  t0 = time.process_time()
  fn()
  return time.process_time() - t0


def make_long_corpus(src: str, path: str, seed: int = 0) -> None:
  """Long-context chats from the plain corpus: each line joins the exchanges of 10 to 240 of
  its chats (about 5k to 130k tokens; the longest are truncated at sample_max_length)."""
  rng = np.random.default_rng(seed)
  with open(src, encoding="utf-8") as f:
    chats = [json.loads(line)["messages"] for line in f]
  with open(path, "w", encoding="utf-8") as f:
    at, i = 0, 0
    while at < len(chats):
      n = int(rng.integers(10, 241))
      msgs = [m for chat in chats[at:at + n] for m in chat if m["role"] != "system"]
      f.write(json.dumps({"id": i, "messages": msgs}) + "\n")
      at, i = at + n, i + 1


def long_rows(tok_dir: str, workdir: str, path: str, workers: int, repeat: int) -> dict:
  """End-to-end tokens/s at pack_max_length 16,384 and 131,072, on the plain chats and on long
  chats made from them, in interleaved rounds (median of `repeat`)."""
  long_path = path.replace(".jsonl", "-long.jsonl")
  if not os.path.isfile(long_path):
    make_long_corpus(path, long_path)
  importlib.import_module("grain")
  runs: dict[str, list[dict]] = {}
  for _ in range(repeat):
    for corpus, src in (("chats", path), ("long_chats", long_path)):
      for pack in (16384, 131072):
        if corpus == "long_chats" and pack == 16384:
          continue  # long samples need long rows (16k would truncate them)
        runs.setdefault(f"{corpus}@{pack}", []).append(
            end_to_end(tok_dir, src, workers, None, pack_len=pack))
  out = {}
  for key, rs in runs.items():
    rates = [r["tokens_per_sec"] for r in rs]
    best = max(rs, key=lambda r: r["tokens_per_sec"])
    out[key] = dict(tokens_per_sec_median=round(statistics.median(rates)), all=rates,
                    tokens=best["tokens"], packs=best["packs"],
                    pack_efficiency=best["pack_efficiency"], seconds=best["seconds"])
  out["ratio_128k_vs_16k_chats"] = round(out["chats@131072"]["tokens_per_sec_median"]
                                         / out["chats@16384"]["tokens_per_sec_median"], 3)
  return out


def science(workdir: str, samples: int, workers: int, repeat: int) -> dict:
  """End-to-end tokens/s: science chats + Intern-S1 tokenizer vs plain chats + Qwen3's."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
  from interns1_layout import write_tokenizer  # pylint: disable=import-outside-toplevel
  qwen_dir = build_qwen_tokenizer(os.path.join(workdir, "qwen3-tokenizer"))
  s1_dir = write_tokenizer(os.path.join(workdir, "interns1-tokenizer"))
  plain = os.path.join(workdir, f"chats-{samples}.jsonl")
  sci = os.path.join(workdir, f"science-chats-{samples}.jsonl")
  if not os.path.isfile(plain):
    make_corpus(plain, samples)
  if not os.path.isfile(sci):
    make_corpus(sci, samples, science=True)
  with open(plain, encoding="utf-8") as f, open(sci, encoding="utf-8") as g:
    plain_chars, sci_chars = len(f.read()), len(g.read())
  cases = {"plain_qwen": (qwen_dir, plain, {}), "science_interns1": (s1_dir, sci, {}),
           "science_interns1_rules": (s1_dir, sci, dict(use_rdkit=False)),
           "plain_interns1": (s1_dir, plain, {})}
  rounds = {name: [] for name in cases}
  for _ in range(repeat):   # interleaved, so a noisy neighbour slows every case alike
    for name, (tok, path, kwargs) in cases.items():
      rounds[name].append(end_to_end(tok, path, workers, None, **kwargs))
  result = {name: dict(min(runs, key=lambda r: r["seconds"]),
                       all_tokens_per_sec=[r["tokens_per_sec"] for r in runs])
            for name, runs in rounds.items()}
  median = {name: statistics.median(r["tokens_per_sec"] for r in runs)
            for name, runs in rounds.items()}
  check = open_encoder(s1_dir)
  result["summary"] = dict(
      science_char_fraction=round(1 - plain_chars / sci_chars, 3),
      smiles_check=check.smiles_check,
      plain_qwen_mtok_per_sec=round(median["plain_qwen"] / 1e6, 3),
      science_interns1_mtok_per_sec=round(median["science_interns1"] / 1e6, 3),
      science_interns1_rules_mtok_per_sec=round(median["science_interns1_rules"] / 1e6, 3),
      plain_interns1_mtok_per_sec=round(median["plain_interns1"] / 1e6, 3),
      slowdown_science_vs_plain=round(median["plain_qwen"] / median["science_interns1"], 3),
      slowdown_science_rules_vs_plain=round(
          median["plain_qwen"] / median["science_interns1_rules"], 3),
      slowdown_plain_interns1_vs_qwen=round(median["plain_qwen"] / median["plain_interns1"], 3))
  return result


def _report(result: dict, out: str | None, **context) -> None:
  """Prints the result (with `context`) as JSON; also writes it to `out`."""
  text = json.dumps(dict(result, **context), indent=2)
  print(text)
  if out:
    with open(out, "w") as f:
      f.write(text + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--balance", action="store_true",
                      help="only measure per-rank attention FLOPs with/without group_by_length")
  parser.add_argument("--data_parallel", type=int, default=8)
  parser.add_argument("--accum", type=int, default=8, help="micro-batches per step (--balance)")
  parser.add_argument("--pack", type=int, default=16384, help="pack_max_length (--balance)")
  parser.add_argument("--scale", action="store_true",
                      help="only measure a folder of many files: memory and descriptors, "
                      "cold and cached")
  parser.add_argument("--files", type=int, default=2000, help="files (--scale)")
  parser.add_argument("--lines_per_file", type=int, default=100, help="chats per file (--scale)")
  parser.add_argument("--images", action="store_true",
                      help="only measure Intern-S1 image loading (decode, tile, normalise)")
  parser.add_argument("--n_images", type=int, default=64, help="generated JPEGs (--images)")
  parser.add_argument("--long", action="store_true",
                      help="end-to-end at 16k- and 128k-token rows (long context)")
  parser.add_argument("--science", action="store_true",
                      help="only measure Intern-S1's scientific tokenizer end to end")
  parser.add_argument("--samples", type=int, default=100_000)
  parser.add_argument("--workers", type=int, default=0, help="0 = the CPUs available")
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxtune-bench"))
  parser.add_argument("--repeat", type=int, default=5,
                      help="rounds of tokenizer_alone and end_to_end, taken in turn")
  parser.add_argument("--out", default=None, help="also write the JSON here")
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  if args.images:
    result = bench_images(args.workdir, args.n_images, args.repeat)
    _report(result, args.out, cpus=encoding.available_cpus(), load_average=os.getloadavg()[0])
    return
  workers = encoding.resolve_workers(args.workers)
  if args.science:
    result = science(args.workdir, args.samples, workers, args.repeat)
    _report(result, args.out, cpus=encoding.available_cpus(), workers=workers,
            load_average=os.getloadavg()[0])
    return
  tok_dir = build_qwen_tokenizer(os.path.join(args.workdir, "qwen3-tokenizer"))
  path = os.path.join(args.workdir, f"chats-{args.samples}.jsonl")
  if not os.path.isfile(path):
    make_corpus(path, args.samples)
  if args.long:
    result = long_rows(tok_dir, args.workdir, path, workers, args.repeat)
    _report(result, args.out, cpus=encoding.available_cpus(), workers=workers,
            load_average=os.getloadavg()[0])
    return
  if args.balance or args.scale:
    if args.balance:
      cache_dir = os.path.join(args.workdir, "balance-cache")
      result = balance(tok_dir, path, workers, cache_dir, args.data_parallel, args.accum,
                       args.pack)
    else:
      result = scale(tok_dir, args.workdir, path, args.files, args.lines_per_file, workers,
                     args.pack)
    _report(result, args.out, cpus=encoding.available_cpus(), workers=workers,
            load_average=os.getloadavg()[0])
    return
  cache_dir = tempfile.mkdtemp(dir=args.workdir, prefix="cache-")

  # Grain's ~1 s import is a one-time process cost, not pipeline throughput: pay it up front.
  importlib.import_module("grain")
  pieces, texts = _message_texts(path)
  result = dict(samples=args.samples, cpus=encoding.available_cpus(), workers=workers,
                file_mb=round(os.path.getsize(path) / 2**20, 1), repeat=args.repeat,
                load_average_before=os.getloadavg()[0])
  # The two figures the overhead compares, taken in turn `repeat` times. Other jobs on a shared
  # machine slow single runs by up to ~30%: the overhead is given best vs best (the runs least
  # disturbed), median vs median and as the median of each round's ratio; every run is listed.
  alone_runs, e2e_runs = [], []
  for _ in range(args.repeat):
    alone_runs.append(tokenizer_alone(tok_dir, pieces, workers))
    e2e_runs.append(end_to_end(tok_dir, path, workers, None))
  alone_s = [r["seconds"] for r in alone_runs]
  e2e_s = [r["seconds"] for r in e2e_runs]
  result["tokenizer_alone"] = min(alone_runs, key=lambda r: r["seconds"])
  result["tokenizer_alone"]["all_seconds"] = alone_s
  result["tiktoken_on_message_texts"] = tokenizer_alone(tok_dir, texts, workers)
  result["hf_tokenizer_alone"] = hf_alone(tok_dir, pieces)
  del pieces, texts
  result["end_to_end"] = min(e2e_runs, key=lambda r: r["seconds"])
  result["end_to_end"]["all_seconds"] = e2e_s
  result["cold_start_with_cache"] = end_to_end(tok_dir, path, workers, cache_dir)
  result["cached_start"] = end_to_end(tok_dir, path, workers, cache_dir)
  shutil.rmtree(cache_dir, ignore_errors=True)
  result["load_average_after"] = os.getloadavg()[0]
  e2e, alone = result["end_to_end"], result["tokenizer_alone"]
  load = statistics.median(r["tokenizer_load_seconds"] for r in e2e_runs)
  result["summary"] = dict(
      end_to_end_mtok_per_sec=round(e2e["tokens_per_sec"] / 1e6, 3),
      tokenizer_alone_mtok_per_sec=round(alone["tokens_per_sec"] / 1e6, 3),
      # Same tokens either way: the ratio of times.
      pipeline_overhead=round(e2e["seconds"] / alone["seconds"] - 1, 3),
      pipeline_overhead_median=round(statistics.median(e2e_s) / statistics.median(alone_s) - 1,
                                     3),
      # Each round's two runs are a minute apart, so they share most of the machine's load.
      pipeline_overhead_paired_median=round(
          statistics.median(e / a for e, a in zip(e2e_s, alone_s)) - 1, 3),
      # Loading the tokenizer (once per run, outside the pipeline in the trainer) counted in.
      pipeline_overhead_median_with_tokenizer_load=round(
          (statistics.median(e2e_s) + load) / statistics.median(alone_s) - 1, 3),
      tokenizer_load_seconds=round(load, 3),
      # CPU time used (all processes): steadier than wall time when other jobs share the CPUs.
      cpu_overhead=round(e2e["cpu_seconds"] / alone["cpu_seconds"] - 1, 3),
      overhead_over_message_texts_only=round(
          e2e["seconds"] / result["tiktoken_on_message_texts"]["seconds"] - 1, 3),
      soft_pack_efficiency=e2e["pack_efficiency"],
      cold_start_seconds=result["cold_start_with_cache"]["start_seconds"],
      cached_start_seconds=result["cached_start"]["start_seconds"],
      cached_speedup=round(result["cold_start_with_cache"]["start_seconds"]
                           / result["cached_start"]["start_seconds"], 1))
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
