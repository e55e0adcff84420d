#!/usr/bin/env bash
# The project's GPU check, on a machine with a CUDA GPU and its CUDA build of torch already installed:
#
#   scripts/gpu_check.sh                 # writes everything under $OUT, or ./gpu-out when OUT is unset
#
# Where one command may run 10 minutes at most and a session has about 15 minutes of device time, run the calls
# below, each on its own (fresh) machine; each builds the models it needs. The first call answers first what the
# streamed step spends its time on; the later ones are for sessions with device time left:
#
#   MLNB_GPU_CHECK_STEPS=environment,install,attribute,bench scripts/gpu_check.sh   # call 1: attribution + SD1.5, SDXL
#   MLNB_GPU_CHECK_STEPS=environment,install,gpu-tests,cell-hooks scripts/gpu_check.sh  # call 2: GPU tests, hooks
#   MLNB_GPU_CHECK_STEPS=environment,install,bench-loras scripts/gpu_check.sh       # call 3: SDXL + LoRAs
#   MLNB_GPU_CHECK_STEPS=environment,install,bench-flux scripts/gpu_check.sh        # call 4: FLUX.1-dev
#   MLNB_GPU_CHECK_STEPS=environment,install,bench-sd35 scripts/gpu_check.sh        # call 5: SD3.5 medium
#
# Call 1 (attribute, bench): scripts/attribute_step.py on SDXL's UNet alone, in one process (resident step against
# its host issue time and a CUDA-graph replay; the planner's 4 GiB plan and its schedule replay; copy-only bandwidth
# from the packed pinned regions against the probe; the plan streamed uncapped and under the 4 GiB cap, with the
# streamer's hook time and the allocator's counters; a profile of two capped steps; the costs of gc.collect,
# empty_cache and regrowing the cache), then `mlnb bench --quick` on SD1.5 and SDXL: the uncapped plain diffusers
# baseline and mlnb-auto under SD1.5's 2 GiB and SDXL's 4 and 15 GiB caps, 8 steps.
# Call 2 (gpu-tests, cell-hooks): the `@pytest.mark.gpu` tests (offloads, the monitor, the deferred release and
# whether its thread lets the notebook run, a capped streamed loop without allocator retries, the CUDA ring) and the
# per-cell hook overhead on CUDA; run it right after call 1, on the machine still warm.
# Call 3 (bench-loras) builds SDXL (real shapes, random weights) and 5 + 5 random rank-32 LoRAs over its attention
# projections, then runs at 8 steps: the uncapped plain diffusers baseline, mlnb-auto under 4 GiB without LoRAs, and
# with the 5 LoRAs loaded: plain diffusers uncapped (load_lora_weights + set_adapters), mlnb-auto under 15, 8 and
# 4 GiB (loras=), plain diffusers-group-stream under 4 GiB; each LoRA run times up to 3 switches to the other 5
# LoRAs and back (median; within 20 s). Its targets: SDXL + LoRAs under 4 GiB ≤ 1.1× SDXL alone under 4 GiB, a
# switch < 1 s; mlnb has unfused adapters only, so the run without LoRAs stands for a fused step.
# Call 4 (bench-flux) builds FLUX.1-dev (33 GB on disk) and runs the uncapped baseline, mlnb-auto and
# diffusers-layerwise-fp8 under 15 GiB: the Flux targets (≤ 1.5× uncapped, faster than the best plain recipe, host
# RSS ≤ 12 GiB) and the planner's budget, peak and time on a transformer.
# Call 5 (bench-sd35): SD3.5 medium under 4 and 8 GiB, mlnb-auto beside diffusers-group-stream; SD3.5 large under 15
# and 8 GiB through MLNB_GPU_CHECK_SD35_OPTS, e.g. "--device cuda --steps 8 --timeout 300 --models sd35-large
# --recipes mlnb-auto,diffusers-layerwise-fp8 --caps sd35-large:15,sd35-large:8" with MLNB_GPU_CHECK_SD35=sd35-large.
#
# Time, an estimate, not a measurement: on an H100 an SDXL run took 25 to 40 s in earlier checks (process start, load,
# warm-up and timed image; 8 or 20 steps), SD1.5 + SDXL builds and 6 runs 223 s at 8 steps, environment and install
# 34 s. Call 1: about 35 s (environment, install) + 30 to 90 s (attribute: SDXL's UNet built on the GPU, about 60
# forwards in all, a 2 GiB pinned copy, a 7 GiB cache regrown; limit 150 s) + about 190 s (the bench: both builds and
# 5 runs), some 4.5 to 5.5 minutes; the bench's limit is 360 s, so the call ends within 570 s even at every limit.
# diffusers-group-stream beside mlnb-auto (MLNB_GPU_CHECK_BENCH) adds 3 runs, about 1.5 minutes. Call 2: about 35 s +
# at most 120 + 30 s (the steps' limits), some 3 minutes. Call 3: counting each LoRA run at about 50 s (5 LoRA loads,
# up to 20 s of switches), about 35 s (environment, install) + 40 s (SDXL build and LoRAs) + 25 + 30 s (runs without
# LoRAs) + 4 × 50 s + 60 s (the group-stream run with LoRAs), about 6.5 minutes; the step's limit is 450 s. Call 4:
# FLUX.1's build took more than 150 s before (writing 33 GB), and each of its three runs loads 33 GB and generates two
# 8-step images, about 45 s each: about 35 + 200 + 135 s, some 6.5 minutes; limit 450 s. Call 5: about 70 s to build
# and 5 runs of 35 to 50 s, some 4.5 minutes.
#
# Steps: install mlnb (editable, keeping the machine's torch; wheels in ./.whl are installed first when the machine
# lacks a dependency and has no package index); `attribute`: scripts/attribute_step.py (JSON attribute-step.json,
# its profiler trace in attribute-trace/; with MLNB_GPU_CHECK_DEVICE=cpu its --tiny run on the CPU); `bench`:
# `mlnb bench --quick` on SD1.5 and SDXL with mlnb-auto beside the plain diffusers baseline; bench-loras, bench-flux
# and bench-sd35 as above; the GPU tests (`pytest -m gpu`, junit xml) and the per-cell hook overhead on
# CUDA (scripts/bench_cell_hooks.py; scripts/allocator_reads.py beside it: what torch's allocator reads cost there).
# scripts/diagnose_streaming.py on the bench's SDXL folder runs when named in
# MLNB_GPU_CHECK_STEPS. Each bench step writes its table, targets and JSON. A failing step does not stop the next;
# a summary with each step's status and time comes last, and the exit status is 1 if any step failed. The results
# come back as at most 8 files: summary.txt, attribute-step.json, each bench step's JSON, and logs.tar.gz with
# every log, the Markdown tables, the workers' logs and the other outputs.
#
# Environment:
#   OUT                    where results go (default ./gpu-out); keep large files out of it
#   MLNB_BENCH_WORK        where the random-weight model folders are built and reused (default /tmp/mlnb-bench-models;
#                          about 9 GiB for SD1.5 + SDXL in fp16, 16 GiB more for SD3.5 medium, 33 GiB for FLUX.1-dev);
#                          bench-flux and bench-sd35 delete their folders after their runs unless
#                          MLNB_GPU_CHECK_KEEP_MODELS=1 (the disk holds 64 GiB)
#   MLNB_GPU_CHECK_DEVICE  the bench steps' --device (default cuda; cpu runs their options on the tiny stand-ins, and
#                          the attribute step's --tiny run)
#   MLNB_GPU_CHECK_BENCH   options for the `bench` step (default: --quick --device cuda --timeout 240
#                          --models sd15,sdxl --recipes mlnb-auto; the uncapped baseline is always added)
#   MLNB_GPU_CHECK_BENCH_LIMIT  the `bench` step's limit in seconds (default 360; more for more models or recipes:
#                          FLUX.1's build alone needs more than 150 s)
#   MLNB_GPU_CHECK_ATTRIBUTE  options of scripts/attribute_step.py (default none: 10 steps a section, 4 GiB)
#   MLNB_GPU_CHECK_LORAS, MLNB_GPU_CHECK_FLUX, MLNB_GPU_CHECK_SD35_OPTS
#                          options of bench-loras, bench-flux and bench-sd35 instead of the defaults below
#   MLNB_GPU_CHECK_SD35    the models of bench-sd35 (default sd35-medium; sd35-large runs uncapped unless
#                          MLNB_GPU_CHECK_SD35_OPTS gives its caps)
#   MLNB_WHEELS            a folder of wheels to install with --no-index --no-deps (default ./.whl, if present)
#   MLNB_CACHE             the planner's card-facts cache (default: a fresh folder, copied to cards.json)
#   MLNB_GPU_CHECK_STEPS   the steps to run, comma-separated (default: environment,install,doctor,attribute,bench,
#                          gpu-tests,cell-hooks; bench-loras, bench-flux, bench-sd35 and diagnose run when named)
#   MLNB_GPU_CHECK_VARIANTS the diagnose step's variants, in order (default headroom,capped+fixed,capped: the
#                          bench's own 4 GiB row is the capped plan already, with expandable segments; capped+fixed
#                          is the same without them; each variant is saved as it ends)
set -u

cd "$(dirname "$0")/.." || exit 1
root=$PWD
out=${OUT:-$root/gpu-out}
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
work=${MLNB_BENCH_WORK:-/tmp/mlnb-bench-models}
dev=${MLNB_GPU_CHECK_DEVICE:-cuda}
bench_opts=${MLNB_GPU_CHECK_BENCH:---quick --device $dev --timeout 240 --models sd15,sdxl --recipes mlnb-auto}
bench_limit=${MLNB_GPU_CHECK_BENCH_LIMIT:-360}
attribute_opts=${MLNB_GPU_CHECK_ATTRIBUTE:-}
# SDXL with 5 + 5 random rank-32 LoRAs: mlnb under 15, 8 and 4 GiB, SDXL alone under 4 GiB, plain diffusers with them
loras_opts=${MLNB_GPU_CHECK_LORAS:---device $dev --steps 8 --timeout 240 --models sdxl --recipes mlnb-auto --caps sdxl:4 \
--loras 5 --lora-rank 32 --lora-recipes mlnb-auto,diffusers-group-stream@4 --lora-caps sdxl:15,sdxl:8,sdxl:4 --lora-switches 3}
flux_opts=${MLNB_GPU_CHECK_FLUX:---device $dev --steps 8 --timeout 300 --models flux-dev \
--recipes mlnb-auto,diffusers-layerwise-fp8 --caps flux-dev:15}
sd35_models=${MLNB_GPU_CHECK_SD35:-sd35-medium}
sd35_opts=${MLNB_GPU_CHECK_SD35_OPTS:---device $dev --steps 8 --timeout 240 --models $sd35_models \
--recipes mlnb-auto,diffusers-group-stream --caps sd35-medium:4,sd35-medium:8}
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

attribute() {
  local tiny=""
  [ "$dev" = cpu ] && tiny=--tiny  # the control flow on a tiny UNet: no CUDA device to measure
  # shellcheck disable=SC2086
  "$python" scripts/attribute_step.py $tiny $attribute_opts --json "$out/attribute-step.json" \
    --trace-dir "$out/attribute-trace"
}

bench() {
  mkdir -p "$work"
  # shellcheck disable=SC2086
  mlnb_cli bench $bench_opts --work-dir "$work" --json "$out/bench-results.json" \
    --markdown "$out/bench-results.md" --log-dir "$out/bench-logs"
}

# bench_named NAME OPTIONS MODELS: one bench step's run, into bench-NAME.json/.md and bench-NAME-logs; the folders
# of MODELS are deleted after it unless MLNB_GPU_CHECK_KEEP_MODELS=1.
bench_named() {
  local name=$1 opts=$2 models=$3 rc m
  mkdir -p "$work"
  # shellcheck disable=SC2086
  mlnb_cli bench $opts --work-dir "$work" --json "$out/bench-$name.json" --markdown "$out/bench-$name.md" \
    --log-dir "$out/bench-$name-logs"
  rc=$?
  if [ "${MLNB_GPU_CHECK_KEEP_MODELS:-0}" != 1 ]; then
    for m in ${models//,/ }; do rm -rf "${work:?}/$m"; done
  fi
  return "$rc"
}

# The steps run in child shells under `timeout`, so they see these as exported functions and variables.
export python root out work dev bench_opts attribute_opts loras_opts flux_opts sd35_opts sd35_models
export -f environment deps_importable install mlnb_cli gpu_tests attribute bench bench_named

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
  case ",${MLNB_GPU_CHECK_STEPS:-environment,install,doctor,attribute,bench,gpu-tests,cell-hooks}," in
    *",$1,"*) return 0 ;;
    *) return 1 ;;
  esac
}

wanted environment && run_step environment 20 bash -c environment
wanted install && run_step install 40 bash -c install
wanted doctor && run_step doctor 20 bash -c "mlnb_cli doctor"
wanted attribute && run_step attribute 150 bash -c attribute
wanted bench && run_step bench "$bench_limit" bash -c bench
wanted bench-loras && run_step bench-loras 450 bash -c 'bench_named loras "$loras_opts" ""'
wanted bench-flux && run_step bench-flux 450 bash -c 'bench_named flux "$flux_opts" flux-dev'
wanted bench-sd35 && run_step bench-sd35 330 bash -c 'bench_named sd35 "$sd35_opts" "$sd35_models"'
if wanted diagnose && [ -d "$work/sdxl" ]; then  # built by the bench
  # The bench's uncapped baseline cached the resident step and block timeline: no resident variant needed.
  run_step diagnose 110 "$python" scripts/diagnose_streaming.py --folder "$work/sdxl" --budget 4GiB --steps 6 \
    --variants "${MLNB_GPU_CHECK_VARIANTS:-headroom,capped+fixed,capped}" --timeout 60 --profile --trace-dir "$out" \
    --json "$out/diagnose-streaming.json"
fi
wanted gpu-tests && run_step gpu-tests 120 bash -c gpu_tests
wanted cell-hooks && run_step cell-hooks 30 "$python" scripts/bench_cell_hooks.py --cells 1000 --json "$out/cell-hooks.json"
wanted cell-hooks && run_step allocator-reads 30 "$python" scripts/allocator_reads.py --reads 5000 \
  --json "$out/allocator-reads.json"
cp "$MLNB_CACHE/cards.json" "$out/cards.json" 2>/dev/null || echo "no card facts were cached"

echo
echo "=== summary ($((SECONDS - start_all))s in all; results in $out) ==="
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
if [ -f "$out/attribute-step.json" ]; then  # the script's own table, one line a question
  "$python" - "$out/attribute-step.json" "$root/scripts" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
sys.path.insert(0, sys.argv[2])
from attribute_step import table
doc = json.load(open(sys.argv[1]))
print(f"attribute: {doc.get('device')} · {doc.get('command')} · {doc.get('date')}")
print("\n".join("  " + line for line in table(doc).splitlines()))
EOF
fi
for result in "$out"/bench-results.json "$out"/bench-loras.json "$out"/bench-flux.json "$out"/bench-sd35.json; do
  [ -f "$result" ] || continue
  "$python" - "$result" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
doc = json.load(open(sys.argv[1]))
print(f"bench: {doc['machine'].get('card')} · {doc['command']} · {doc['date']}")
for t in doc.get("targets", []):
    print(f"  [{t['status']}] {t['target']}\n      {t['detail']}")
for item in doc.get("loras") or []:
    cap = f"cap {item['cap_bytes'] / 2**30:g} GiB" if item.get("cap_bytes") else "no cap"
    line = f"  LoRAs, {item['model']} {item['recipe']} {cap}: {item['loras']} of rank {item.get('lora_rank')}, {item['status']}"
    if item.get("seconds"):
        line += f", {item['seconds']:.2f} s/img"
    if item.get("switch_seconds") is not None:
        line += f", switch {item['switch_seconds']:.2f} s"
    if item.get("unfused_ratio") is not None:
        line += f", {item['unfused_ratio']:.2f}x the same recipe without LoRAs"
    print(line)
for r in doc.get("runs", []):
    cap = f"cap {r['cap_bytes'] / 2**30:g} GiB" if r.get("cap_bytes") else "no cap"
    rss = r.get("host_rss_peak")
    print(f"  row, {r['model']} {r['recipe']}{' +' + str(r['loras']) + ' LoRAs' if r.get('loras') else ''} {cap}: "
          f"{r.get('status')}, {r.get('seconds') or 0:.2f} s/img, host RSS {(rss or 0) / 2**30:.2f} GiB")
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
done
for result in "$out"/cell-hooks.json "$out"/allocator-reads.json; do
  [ -f "$result" ] || continue
  "$python" - "$result" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
doc = json.load(open(sys.argv[1]))
if "median_overhead_ms" in doc:
    print(f"cell hooks on {doc.get('device')}: {doc['median_overhead_ms']:.3f} ms a cell (target <= {doc['target_ms']} ms)")
else:
    print(f"allocator reads from {doc['source']}: four figures {doc['four_figures_us']:.1f} us a snapshot, "
          f"one nested read {doc['one_nested_read_us']:.1f} us")
EOF
done
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
# What comes back is at most 8 files: summary.txt, the attribution and bench JSONs, and everything else in
# logs.tar.gz (the attribution's profiler trace among them).
(
  cd "$out" || exit 1
  shopt -s nullglob
  rest=()
  for f in *; do
    case "$f" in summary.txt|attribute-step.json|bench-results.json|bench-loras.json|bench-flux.json|bench-sd35.json|logs.tar.gz) ;; *) rest+=("$f") ;; esac
  done
  if [ ${#rest[@]} -gt 0 ] && tar -czf logs.tar.gz "${rest[@]}"; then
    rm -rf "${rest[@]}"
  fi
)
ls -la "$out"
exit "$failed"
