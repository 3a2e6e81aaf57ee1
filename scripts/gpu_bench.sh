#!/usr/bin/env bash
# jaxtune against the PyTorch stack on one GPU, side by side in one run (issue 12).
#
# Here:            bash scripts/fetch_gpu_wheels.sh        (the wheels the GPU image lacks)
# On the device:   bash scripts/gpu_bench.sh               (device run with carry [".whl"])
#
# Writes under $OUT (./gpu_out when OUT is unset):
#   bench.jsonl   one JSON line per case from bench_train.py / bench_torch_baseline.py, or a
#                 {"case", "status": "timeout" | "failed" | "skipped"} line
#   bench.log     every case's stdout and stderr, with this script's own lines
#   env.json      package versions and the GPU
#   summary.txt   the side-by-side table and the issue's three targets, also printed last
#   kernels.json  scripts/gpu_kernels.py's output, when that script exists (run first)
#
# Every case has its own timeout, and the whole run a budget (GPU_BENCH_BUDGET_S, default
# 360 s: well inside the 8 minutes a session has, so one rerun fits): a case starts only if
# at least GPU_BENCH_MIN_CASE_S (45 s) of the budget is left, and its timeout is cut to what
# is left. Cases run in order of importance: Qwen3-1.7B at 16,384 tokens per row (the
# target) for both stacks, torch.compile for torch, then Qwen3-0.6B, then Qwen3-4B.
# GPU_BENCH_CASES="jax_1_7b torch_1_7b" runs only the named cases (names below);
# GPU_BENCH_SITE (default /tmp/site) is where the wheels go; GPU_BENCH_SKIP_KERNELS=1 skips
# gpu_kernels.py (a rerun, or the second call of the window plan), GPU_BENCH_KERNELS_S (default
# 150) is its timeout, GPU_BENCH_CASES=kernels runs it alone; GPU_BENCH_STEPS (default 4)
# timed steps per case; GPU_BENCH_PACK (default 16384) tokens per row; GPU_BENCH_EXTRA extra
# flags for every case (a CPU dry run of this script: GPU_BENCH_PACK=256
# GPU_BENCH_EXTRA="--layers=1 --vocab=1024 --mean_len=64" GPU_BENCH_TORCH_ATTENTION=sdpa:
# flex attention has no backward pass on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
START=$SECONDS
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_BENCH_BUDGET_S:-360}
MIN_CASE=${GPU_BENCH_MIN_CASE_S:-45}
STEPS=${GPU_BENCH_STEPS:-4}
LOG="$OUT/bench.log"
JSONL="$OUT/bench.jsonl"
: >"$JSONL"
: >"$LOG"

log() { echo "[gpu_bench +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# ---- what the image lacks: the carried wheels, then jaxtune from this checkout ---------------
SITE=${GPU_BENCH_SITE:-/tmp/site}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl >>"$LOG" 2>&1 || { log "installing .whl/ failed"; exit 1; }
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  log "installed $(ls .whl/*.whl | wc -l) wheels to $SITE"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  log "no .whl/: run 'bash scripts/fetch_gpu_wheels.sh' here and carry .whl (trying anyway)"
fi

python3 - "$OUT/env.json" >>"$LOG" 2>&1 <<'EOF'
import json, subprocess, sys
from importlib import metadata
names = ["jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "grain",
         "ml-collections", "numpy", "torch", "triton", "transformers", "safetensors"]
env = {}
for name in names:
  try:
    env[name] = metadata.version(name)
  except metadata.PackageNotFoundError:
    env[name] = None
try:
  env["gpu"] = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
       "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as e:
  env["gpu"] = f"nvidia-smi failed: {e}"
env["python"] = sys.version.split()[0]
import jaxtune  # the checkout and the wheels import
env["jaxtune"] = jaxtune.__file__
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
EOF
[ -s "$OUT/env.json" ] && log "env: $(tr -d '\n' <"$OUT/env.json")" || log "env check failed (see bench.log)"

# ---- cases -------------------------------------------------------------------------------------
status_line() {  # case, status, rc
  echo "{\"case\": \"$1\", \"status\": \"$2\", \"rc\": $3}" >>"$JSONL"
}

run_case() {  # name, timeout_s, command...
  local name=$1 limit=$2
  shift 2
  if [ -n "${GPU_BENCH_CASES:-}" ] && [[ " $GPU_BENCH_CASES " != *" $name "* ]]; then
    return 0
  fi
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt "$MIN_CASE" ]; then
    log "skip $name: ${left}s of the ${BUDGET}s budget left"
    status_line "$name" skipped 0
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "start $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  log "end $name: rc=$rc after $((SECONDS - t0))s"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status_line "$name" timeout "$rc"
  elif [ "$rc" -ne 0 ]; then
    status_line "$name" failed "$rc"
  fi
}

KERNELS_S=${GPU_BENCH_KERNELS_S:-150}
if [ -f scripts/gpu_kernels.py ] && [ -z "${GPU_BENCH_SKIP_KERNELS:-}" ]; then
  # gpu_kernels.py starts no new case in the last 50 s of its timeout
  run_case kernels "$KERNELS_S" python3 scripts/gpu_kernels.py --out "$OUT/kernels.json" \
    --budget-s=$((KERNELS_S > 100 ? KERNELS_S - 50 : 50))
fi

PACK=${GPU_BENCH_PACK:-16384}
# shellcheck disable=SC2206
EXTRA=(${GPU_BENCH_EXTRA:-})
jax_case() {  # name, timeout, preset
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run_case "$1" "$2" python3 scripts/bench_train.py \
    --preset="$3" --pack=$PACK --batch=1 --steps="$STEPS" --warmup=1 --attention=auto \
    --remat=full --tag="$1" --json_out="$JSONL" "${EXTRA[@]}"
}
TORCH_ATTENTION=${GPU_BENCH_TORCH_ATTENTION:-flex}
torch_case() {  # name, timeout, preset, compile
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run_case "$1" "$2" python3 \
    scripts/bench_torch_baseline.py --preset="$3" --pack=$PACK --batch=1 --steps="$STEPS" \
    --warmup=2 --attention="$TORCH_ATTENTION" --precision=amp --remat=full --loss=chunked \
    --compile="$4" --tag="$1" --json_out="$JSONL" "${EXTRA[@]}"
}
best_torch_compile() {  # the compile mode that gave torch the higher tokens/s at 1.7B
  python3 - "$JSONL" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rate = {r["compile"]: r["tokens_per_sec_per_device"] for r in rows
        if r.get("stack") == "torch" and r.get("preset") == "qwen3_1_7b"}
print(max(rate, key=rate.get) if rate else "none")
EOF
}

jax_case jax_1_7b 150 qwen3_1_7b
torch_case torch_1_7b 150 qwen3_1_7b none
if grep -Eq '"case": "torch_1_7b", "status": "(failed|timeout)"' "$JSONL" \
    && [ "$TORCH_ATTENTION" = flex ]; then
  log "torch_1_7b gave no figures with flex attention: the SDPA path instead"
  TORCH_ATTENTION=sdpa
  torch_case torch_1_7b_sdpa 150 qwen3_1_7b none
fi
torch_case torch_1_7b_compiled 180 qwen3_1_7b layers
COMPILE=$(best_torch_compile)
log "torch compile mode for the other sizes: $COMPILE"
jax_case jax_0_6b 100 qwen3_0_6b
torch_case torch_0_6b 120 qwen3_0_6b "$COMPILE"
jax_case jax_4b 150 qwen3_4b
torch_case torch_4b 150 qwen3_4b "$COMPILE"

# ---- summary -----------------------------------------------------------------------------------
python3 - "$JSONL" "$OUT/summary.txt" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
lines = ["| case | stack | model | step time | tokens/s/GPU | MFU | peak GiB | compile s |",
         "|---|---|---|---|---|---|---|---|"]
for r in rows:
  if "status" in r:
    lines.append(f"| {r['case']} | {r['status']} (rc {r['rc']}) | | | | | | |")
    continue
  lines.append(f"| {r.get('case')} | {r['stack']}"
               + (f" (compile={r['compile']})" if r["stack"] == "torch" else "")
               + f" | {r['preset']} | {r['step_time_s']:.3f} s | {r['tokens_per_sec_per_device']:,.0f}"
               f" | {r['mfu']} | {r['peak_gib']} | {r['compile_s']} |")
jax = [r for r in rows if r.get("stack") == "jaxtune" and r.get("preset") == "qwen3_1_7b"]
tor = [r for r in rows if r.get("stack") == "torch" and r.get("preset") == "qwen3_1_7b"]
def verdict(ok):
  return "n/a" if ok is None else ("met" if ok else "NOT met")
if jax and tor:
  j, t = jax[0], max(tor, key=lambda r: r["tokens_per_sec_per_device"])
  ratio = j["tokens_per_sec_per_device"] / t["tokens_per_sec_per_device"]
  mem_ok = (None if j["peak_gib"] is None or t["peak_gib"] is None
            else j["peak_gib"] <= t["peak_gib"])
  lines += ["", f"Qwen3-1.7B at {j['pack']:,} tokens/row, jaxtune vs the faster torch run "
            f"({t['case']}, attention={t['attention']}, compile={t['compile']}):",
            f"  MFU {j['mfu']} (target >= 0.50): "
            + verdict(None if j["mfu"] is None else j["mfu"] >= 0.5),
            f"  tokens/s {ratio:.2f}x torch's (target >= 1.3x): {verdict(ratio >= 1.3)}",
            f"  peak memory {j['peak_gib']} vs {t['peak_gib']} GiB (target <=): "
            + verdict(mem_ok)]
else:
  lines += ["", "Qwen3-1.7B: a stack's figures are missing (see bench.log)"]
text = "\n".join(lines)
open(sys.argv[2], "w").write(text + "\n")
print(text)
EOF
log "done in $((SECONDS - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
