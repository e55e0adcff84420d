#!/usr/bin/env bash
# The project's GPU check, in one command, on a machine with a CUDA GPU and its CUDA build of torch already installed:
#
#   scripts/gpu_check.sh                 # writes everything under $OUT, or ./gpu-out when OUT is unset
#
# Steps: install mlnb (editable, keeping the machine's torch; wheels in ./.whl are installed first when the machine
# lacks a dependency and has no package index), `mlnb bench --quick` on SD1.5, SDXL, SD3.5 medium and FLUX.1-dev
# (table, targets, JSON, Markdown, one log per worker; the transformer models at one cap each, SD3.5 medium at 4 GiB
# and FLUX.1-dev at 15 GiB, beside their uncapped baseline), the GPU tests (`pytest -m gpu`, junit xml), and the
# per-cell hook overhead on CUDA (scripts/bench_cell_hooks.py). scripts/diagnose_streaming.py on the bench's SDXL
# folder (the plan for 85% of 4 GiB under a 4 GiB cap, the 4 GiB plan with the allocator's expandable segments, then
# as the bench ran it; each with its schedule replay and a profile, saved as it ends) runs when named in
# MLNB_GPU_CHECK_STEPS: the two transformer models' builds (T5-XXL and a 12 B transformer, 33 GB on disk for FLUX.1)
# and runs take its time. The benchmark comes before the tests: it is the step whose numbers the docs need. A failing
# step does not stop the next one; a summary with each step's status and time comes last, and the exit status is 1 if
# any step failed. The default step limits add up to 790 s; on an H100 the check took 342 to 392 s before the
# transformer models joined the bench, whose share has not been measured yet. Where one command may run 10 minutes at
# most, run it as two: MLNB_GPU_CHECK_STEPS=environment,install,bench, then install,gpu-tests,cell-hooks.
#
# Environment:
#   OUT                    where results go (default ./gpu-out); keep large files out of it
#   MLNB_BENCH_WORK        where the random-weight model folders are built and reused (default /tmp/mlnb-bench-models;
#                          about 9 GiB for SD1.5 + SDXL in fp16, 16 GiB more for SD3.5 medium, 33 GiB for FLUX.1-dev)
#   MLNB_GPU_CHECK_BENCH   options for mlnb bench (default: --quick --device cuda --timeout 240
#                          --models sd15,sdxl,sd35-medium,flux-dev; FLUX.1's build needs more than 150 s)
#   MLNB_WHEELS            a folder of wheels to install with --no-index --no-deps (default ./.whl, if present)
#   MLNB_CACHE             the planner's card-facts cache (default: a fresh folder, copied to $OUT/cards.json)
#   MLNB_GPU_CHECK_STEPS   the steps to run, comma-separated (default: environment,install,doctor,bench,gpu-tests,
#                          cell-hooks; diagnose runs when named); "environment,install,bench" makes a shorter call
#   MLNB_GPU_CHECK_VARIANTS the diagnose step's variants, in order (default headroom,capped+expandable,capped: the
#                          bench's own 4 GiB row is the capped plan already; each variant is saved as it ends)
set -u

cd "$(dirname "$0")/.." || exit 1
root=$PWD
out=${OUT:-$root/gpu-out}
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
work=${MLNB_BENCH_WORK:-/tmp/mlnb-bench-models}
bench_opts=${MLNB_GPU_CHECK_BENCH:---quick --device cuda --timeout 240 --models sd15,sdxl,sd35-medium,flux-dev}
wheels=${MLNB_WHEELS:-$root/.whl}
# Card facts (bandwidth, step times) start empty, so the planner's predictions come from this run's measurements.
export MLNB_CACHE=${MLNB_CACHE:-$(mktemp -d /tmp/mlnb-cache-XXXX)}
python=${PYTHON:-python}
# If the install step cannot put mlnb on the path, the source tree still can.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
summary=()
failed=0
start_all=$SECONDS

# run_step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, record status and time.
run_step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS rc
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s) ==="
  timeout --kill-after=20 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start)) status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="TIMED OUT after ${limit}s"
  elif [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc)"
  fi
  [ "$status" = ok ] || failed=1
  summary+=("$(printf '%-10s %-24s %4ss  log: %s' "$name" "$status" "$took" "$out/$name.log")")
  echo "=== $name: $status in ${took}s ==="
  return "$rc"
}

deps_importable() {
  "$python" - <<'EOF'
import importlib, sys
missing = []
for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "IPython", "tqdm", "psutil",
             "PIL", "numpy", "pytest", "pynvml"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__})")
print("missing: " + ", ".join(missing) if missing else "every dependency imports")
sys.exit(1 if missing else 0)
EOF
}

install() {
  local torch_version constraints
  torch_version=$("$python" -c 'import torch; print(torch.__version__)') || {
    echo "torch is not importable: this check needs the machine's CUDA build of torch"
    return 1
  }
  echo "torch $torch_version (kept as is)"
  # Every dependency already there (the machine's own or the wheels above): install mlnb alone, offline.
  if deps_importable; then
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . && return 0
    echo "pip could not install mlnb; the steps below use the source tree (PYTHONPATH)"
    return 0
  fi
  constraints=$(mktemp)
  echo "torch==$torch_version" > "$constraints"
  if "$python" -m pip install --no-index --no-build-isolation -e . ; then
    rm -f "$constraints"; return 0
  fi
  echo "offline install failed (a dependency is missing); trying the package index, torch pinned to $torch_version"
  if PIP_DEFAULT_TIMEOUT=10 timeout 50 "$python" -m pip install --no-build-isolation -c "$constraints" -e ".[gpu]" pytest; then
    rm -f "$constraints"; return 0
  fi
  rm -f "$constraints"
  echo "could not install dependencies; installing mlnb alone (the steps below use the source tree)"
  "$python" -m pip install --no-deps --no-build-isolation -e . || true
  "$python" - <<'EOF'
import importlib
for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "pytest", "pynvml"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:<13} {getattr(mod, '__version__', 'installed')}")
    except Exception as exc:
        print(f"{name:<13} MISSING ({type(exc).__name__})")
EOF
  return 1
}

environment() {
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  # The checkout's HEAD may not be what is on disk (a copied working tree): the tree hash names the files exactly;
  # `git log --format='%h %T'` maps it back to a commit.
  echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
  local index
  index=$(mktemp -u)
  echo "tree of the files here: $(GIT_INDEX_FILE=$index git -C "$root" add -A 2>/dev/null && GIT_INDEX_FILE=$index git -C "$root" write-tree 2>/dev/null || echo unknown)"
  rm -f "$index"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  "$python" -m pip list 2>/dev/null | grep -iE '^(torch|diffusers|transformers|accelerate|peft|safetensors|nvidia-ml-py|xformers|pytest|mlnb) ' || true
}

mlnb_cli() {
  if command -v mlnb >/dev/null 2>&1; then
    mlnb "$@"
  else
    "$python" -m mlnb.cli "$@"
  fi
}

gpu_tests() {
  local rc
  # tests/ only, without the notebook (nbval) options of pyproject's addopts: the GPU tests need no Jupyter.
  "$python" -m pytest tests -m gpu -q -rs -o addopts="-p no:cacheprovider" --junitxml="$out/pytest-gpu.xml"
  rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "no GPU tests were collected"
    return 0
  fi
  return "$rc"
}

bench() {
  mkdir -p "$work"
  # shellcheck disable=SC2086
  mlnb_cli bench $bench_opts --work-dir "$work" --json "$out/bench-results.json" \
    --markdown "$out/bench-results.md" --log-dir "$out/bench-logs"
}

# The steps run in child shells under `timeout`, so they see these as exported functions and variables.
export python root out work bench_opts
export -f environment deps_importable install mlnb_cli gpu_tests bench

# Wheels carried to a machine without a package index: installed into a folder on PYTHONPATH, before any step.
if compgen -G "$wheels/*.whl" >/dev/null; then
  site=/tmp/mlnb-wheels-site
  echo "=== wheels: installing $(ls "$wheels"/*.whl | wc -l) from $wheels into $site ==="
  if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
      > "$out/wheels.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$site"  # carry only what the machine lacks: these come before its site-packages
  else
    echo "wheel install failed (see $out/wheels.log)"
  fi
fi

# wanted NAME: whether the step NAME is among $MLNB_GPU_CHECK_STEPS (default: all of them).
wanted() {
  case ",${MLNB_GPU_CHECK_STEPS:-environment,install,doctor,bench,gpu-tests,cell-hooks}," in
    *",$1,"*) return 0 ;;
    *) return 1 ;;
  esac
}

wanted environment && run_step environment 20 bash -c environment
wanted install && run_step install 40 bash -c install
wanted doctor && run_step doctor 20 bash -c "mlnb_cli doctor"
wanted bench && run_step bench 560 bash -c bench
if wanted diagnose && [ -d "$work/sdxl" ]; then  # built by the bench
  # The bench's uncapped baseline cached the resident step and block timeline: no resident variant needed.
  run_step diagnose 110 "$python" scripts/diagnose_streaming.py --folder "$work/sdxl" --budget 4GiB --steps 6 \
    --variants "${MLNB_GPU_CHECK_VARIANTS:-headroom,capped+expandable,capped}" --timeout 60 --profile --trace-dir "$out" \
    --json "$out/diagnose-streaming.json"
fi
wanted gpu-tests && run_step gpu-tests 120 bash -c gpu_tests
wanted cell-hooks && run_step cell-hooks 30 "$python" scripts/bench_cell_hooks.py --cells 1000 --json "$out/cell-hooks.json"
cp "$MLNB_CACHE/cards.json" "$out/cards.json" 2>/dev/null || echo "no card facts were cached"

echo
echo "=== summary ($((SECONDS - start_all))s in all; results in $out) ==="
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
if [ -f "$out/bench-results.json" ]; then
  "$python" - "$out/bench-results.json" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
doc = json.load(open(sys.argv[1]))
print(f"bench: {doc['machine'].get('card')} · {doc['command']} · {doc['date']}")
for t in doc.get("targets", []):
    print(f"  [{t['status']}] {t['target']}")
for r in doc.get("runs", []):
    cap = f"cap {r['cap_bytes'] / 2**30:g} GiB" if r.get("cap_bytes") else "no cap"
    if r.get("allocator"):
        print(f"  allocator, {r['model']} {r['recipe']} {cap}: " + ", ".join(f"{k} {v}" for k, v in r["allocator"].items()))
    if r.get("allocator_loop"):
        print(f"  allocator in steps 2.., {r['model']} {r['recipe']} {cap}: "
              + ", ".join(f"{k} {v}" for k, v in r["allocator_loop"].items()))
    if r.get("cleanup_steps"):
        timed = r.get("cleanup_timings") or [[step, None] for step in r["cleanup_steps"]]
        freed = f" ({r['cleanup_freed'] / 2**30:.2f} GiB freed)" if r.get("cleanup_freed") is not None else ""
        held = ""
        if r.get("cleanup_held") is not None:  # what asked for the gc.collect, and whether it was a cycle
            held = (f"; {r['cleanup_held'] / 2**20:.1f} MiB held after the clear, "
                    f"{(r.get('cleanup_collected') or 0) / 2**20:.1f} MiB given back by the collection")
        print(f"  cleanup, {r['model']} {r['recipe']} {cap}: {r.get('cleanup_seconds') or 0:.3f} s{freed}, "
              + " + ".join(step if s is None else f"{step} {s:.3f} s" for step, s in timed) + held)
    if r.get("phase_seconds") or r.get("first_step_seconds"):
        phases = [f"{k} {v:.3f} s" for k, v in (r.get("phase_seconds") or {}).items()]
        if r.get("first_step_seconds"):
            phases.append(f"first step (with encoding) {r['first_step_seconds']:.3f} s")
        print(f"  phases, {r['model']} {r['recipe']} {cap}: " + ", ".join(phases))
    if r.get("decode_seconds") is not None:
        print(f"  decode, {r['model']} {r['recipe']} {cap}: {r['decode_seconds']:.3f} s in {r.get('vae_decode')}")
    if r.get("replayed_step_seconds") and r.get("step_seconds"):
        print(f"  schedule, {r['model']} {r['recipe']} {cap}: step {r['step_seconds']:.4f} s measured, "
              f"{r['replayed_step_seconds']:.4f} s replayed against the resident block timeline")
bad = [r for r in doc.get("runs", []) if r.get("status") not in ("ok", "OOM", "skipped")]
print(f"  runs: {len(doc.get('runs', []))}, with an error: {len(bad)}")
EOF
fi
if [ -f "$out/diagnose-streaming.json" ]; then
  "$python" - "$out/diagnose-streaming.json" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
doc = json.load(open(sys.argv[1]))
for r in doc.get("rows", []):
    if r.get("error"):
        print(f"diagnose {r['variant']}: error: {r['error']}")
        continue
    t = r.get("timeline") or {}
    line = f"diagnose {r['variant']}: step {r.get('step_seconds') or 0:.3f} s, overlap {r.get('overlap', float('nan')):.2f}"
    if r.get("replayed_step_seconds"):
        line += f", replayed {r['replayed_step_seconds']:.3f} s"
    if t.get("error"):
        line += f"; profile failed: {t['error']}"
    elif t.get("copies"):
        bw = t.get("copy_bandwidth")
        line += (f"; profiled: copies {t['copy_seconds']:.3f} s" + (f" at {bw / 1e9:.1f} GB/s" if bw else "")
                 + f", {t['hidden']:.0%} under a kernel, GPU idle {t['idle_seconds']:.3f} of {t['window_seconds']:.3f} s")
    if r.get("allocator"):
        line += "; allocator " + ", ".join(f"{k} {v}" for k, v in r["allocator"].items())
    print(line)
EOF
fi
exit "$failed"
