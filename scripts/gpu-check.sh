#!/usr/bin/env bash
# The device check (issue 12, item 4): one command that checks and measures the engine on a GPU.
#
#   scripts/gpu-check.sh              # on a machine with a CUDA GPU, from the repository root or anywhere
#   scripts/gpu-check.sh --dry-run    # print the commands only
#   DEVICE=cpu scripts/gpu-check.sh   # the same steps on the CPU with a tiny shape (tests the script)
#
# It needs only a PyTorch stack (torch, transformers, safetensors, numpy, tqdm, pytest): no installs,
# no downloads. The package is taken from this source tree (PYTHONPATH), nothing is written into it.
# Steps, each with its own time limit; a failed step is reported and the others still run:
#   1. pytest -m cuda: tests/test_engine_cuda.py (the engine and its CUDA graphs on the GPU), then
#      python -m adaserve.runtime.weight_floor: decode and verification steps of every shape against
#      the weight-read floor, CUDA graphs on and off (random weights drawn on the GPU)
#   2. a random-weight checkpoint of the first shape (Llama-3.2-1B: bf16, no tokenizer, so the
#      byte tokenizer), written under $WORK (in /dev/shm when it has room)
#   3. adaserve profile of that shape (n-gram drafter, with CUDA graphs as the runs use them; the
#      profile the simulator prices with), then adaserve run of each of SYSTEMS on a generated
#      RPS-4.8 trace with that profile, at each time scale of RUN_SCALES (arrival times multiplied),
#      recording the draft acceptance and logging every iteration (scripts/engine_steps.py)
#   4. adaserve bench engine on each of BENCH_SHAPES (default: the first shape; the 8B shape's steps
#      are the floor step's, and its checkpoint and benchmark add minutes), CUDA graphs on (and off
#      with BENCH_GRAPHS="on off") (synthetic text prompts: the offline prompt pool is a wheel such
#      machines lack); transformers' generate as the peer on the 1B shape; then, step "host", on the
#      first shape the host work per iteration (bench engine --only host: 16 and 64 requests,
#      1k-token prompts, D=8 W=3 trees) and the host cost of a verification batch's attention masks,
#      dense against windows (scripts/bench_mask_build.py: 64 trees over 1k-8k-token contexts). Last,
#      so that a check cut short by its caller's time limit has the serving runs already
#   5. one table of the results (scripts/gpu_check_table.py), also written to $WORK/table.md, with each
#      run simulated from the profile and its recorded acceptance beside the engine's numbers (issue 14)
#
# Environment: DEVICE (cuda | cpu; default cuda), PYTHON (default: python3), WORK (default: a new
# temporary folder), STEP_TIMEOUT (seconds per step, default 240), SHAPES (default
# "llama-3.2-1b llama-3.1-8b"; with DEVICE=cpu "llama-tiny"), BENCH_SHAPES (the shapes step 4
# benchmarks, default the first of SHAPES; e.g. "llama-3.2-1b llama-3.1-8b"), RUN_REQUESTS (default 40), SYSTEMS
# (default "vllm adaserve adaserve_plus"), RUN_SCALES (the runs' --time-scale values, default "1";
# e.g. "1 0.25" adds every system with arrivals 4x denser, as run-<system>-x0.25), SKIP (steps to
# leave out, of: tests floor runs bench host; e.g. SKIP="tests bench host" for the serving runs alone), BENCH_GRAPHS (CUDA graphs settings of the
# benchmark, default "on"; "on off" adds eager benchmarks), PYTEST_K (the pytest -k filter on CUDA,
# default "not weight_bandwidth": the 1B and 8B profile tests, whose steps the floor step times),
# CYCLES (cycle lengths, e.g. "32": the runs again on a checkpoint of the first shape whose greedy
# output runs around cycles of the vocabulary, random_checkpoint --cycles, where the n-gram drafter
# finds what random weights never offer; same shapes, so the same profile; as run-<system>-cycles.
# The trace's prompts all end with '.', so every request enters that token's cycle: with 32 and
# 64-token outputs AdaServe committed 1.75 tokens per step on the tiny shape, 2.9 with 16),
# PLAIN_RUNS (0, with CYCLES: the runs on the cycling checkpoint only, not on the plain random
# one, whose drafts rarely hit; the serving runs then take half the time),
# SYNC_DEBUG (1: after the runs, a 10-request adaserve run with torch's sync debug mode, which prints
# where the host waited for the GPU, and its first 3 iterations with a prompt waiting profiled by
# operator; its timings are not comparable), SPLIT_AB (1, on CUDA: one more adaserve run, of the
# last model at the first scale, with ADASERVE_GRAPH_PARTS=1: the same run without steps split
# into one graphed forward per attention group, as run-adaserve...-parts1), MASK_AB (1, on CUDA: the
# same with ADASERVE_DEVICE_MASK=0, dense attention masks built on the host and copied instead of
# windows spelled out on the GPU, as run-adaserve...-densemask), PAGED_AB (1, on CUDA: the weight-floor
# steps with graphs again and that adaserve run again with ADASERVE_PAGED_ATTENTION=1, decode and tree
# attention read from the paged cache by a Triton kernel, as floor-paged.json and
# run-adaserve...-paged). The engine's own settings pass through, e.g.
# ADASERVE_GRAPH_PARTS=1 (no step split into one graphed forward per attention group; the profile
# records it, so the simulator prices the same way).
# On one H200 a run cut at 9 minutes had not reached the 8B benchmark; SKIP="tests bench" took 3 min
# 20 s (docs/engine.md, "GPU check").
set -uo pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
  "") ;;
  *) echo "gpu-check: unknown argument '$1' (use --dry-run or --help)" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
RUN_REQUESTS=${RUN_REQUESTS:-40}
SYSTEMS=${SYSTEMS:-vllm adaserve adaserve_plus}
RUN_SCALES=${RUN_SCALES:-1}
CYCLES=${CYCLES:-}
if [[ -n $CYCLES && ! $CYCLES =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]]; then
  echo "gpu-check: CYCLES must be positive cycle lengths separated by commas (e.g. 8,16,32,64,128), got '$CYCLES'" >&2
  exit 2
fi
PLAIN_RUNS=${PLAIN_RUNS:-1}
if [[ $PLAIN_RUNS != 0 && $PLAIN_RUNS != 1 ]] || [[ $PLAIN_RUNS == 0 && -z $CYCLES ]]; then
  echo "gpu-check: PLAIN_RUNS is 1 (default) or 0, and 0 needs CYCLES (else no run is left), got '$PLAIN_RUNS'" >&2
  exit 2
fi
SKIP=${SKIP:-}
for s in $SKIP; do
  case $s in tests|floor|runs|bench|host) ;;
    *) echo "gpu-check: SKIP names unknown step '$s' (tests floor runs bench host)" >&2; exit 2 ;;
  esac
done
for x in $RUN_SCALES; do
  if ! [[ $x =~ ^[0-9]*\.?[0-9]+$ ]] || [[ $x =~ ^[0.]+$ ]]; then
    echo "gpu-check: RUN_SCALES holds '$x', not a positive number (time scales, e.g. \"1 0.25\")" >&2; exit 2
  fi
done
wanted() { [[ " $SKIP " != *" $1 "* ]]; }
if [[ $DEVICE == cpu ]]; then
  SHAPES=${SHAPES:-llama-tiny}
  GRAPHS=(off)                 # CUDA graphs exist on CUDA only
  BENCH_SIZE=(--batches "1,4" --context 32 --steps 3 --prompt-len 16 --new-tokens 8 --repeat 1)
  HOST_SIZE=(--batches 4 --context 64 --depth 3 --width 2 --steps 3)
  MASK_SIZE=(--requests 4 --contexts 64 --depth 3 --width 2 --rounds 3)
  RUN_SIZE=(--output-len-cap 8 --max-num-seqs 8)
  PROFILE_SIZE=(--quick --max-model-len 512)
  TESTS=(-k graph)             # the CUDA tests run on the CPU too, slowly: the CUDA-graph ones only
  FLOOR_GRAPHS=on              # the padded steps, run eagerly
elif [[ $DEVICE == cuda* ]]; then
  SHAPES=${SHAPES:-llama-3.2-1b llama-3.1-8b}
  read -ra GRAPHS <<< "${BENCH_GRAPHS:-on}"   # eager steps: the floor table's "off" rows
  BENCH_SIZE=(--batches "1,16" --steps 8 --prompt-len 64 --new-tokens 32 --repeat 1)
  HOST_SIZE=(--batches "16,64")   # the host-work breakdown's defaults: 1k-token prompts, D=8 W=3 trees
  MASK_SIZE=(--contexts "1024,4096,8192" --rounds 20)   # 64 trees of D=8 W=3
  RUN_SIZE=(--output-len-cap 64)
  PROFILE_SIZE=()
  TESTS=(-k "${PYTEST_K:-not weight_bandwidth}")   # the big shapes' steps: the weight-floor step measures them
  FLOOR_GRAPHS=on,off
else
  echo "gpu-check: DEVICE must be cuda[:N] or cpu, got '$DEVICE'" >&2
  exit 2
fi
if [[ -z ${WORK:-} ]]; then
  base=${TMPDIR:-/tmp}
  # the 8B checkpoint is 16 GB: write it to memory when there is room
  if [[ -d /dev/shm && -w /dev/shm ]] && (( $(df -Pk /dev/shm | awk 'NR==2 {print $4}') > 40000000 )); then
    base=/dev/shm
  fi
  if ((DRY)); then WORK="$base/adaserve-gpu-check.XXXX"; else WORK=$(mktemp -d "$base/adaserve-gpu-check.XXXX"); fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export ADASERVE_CACHE="$WORK/cache"        # quick profiles are cached here, not in ~/.cache
export PYTHONDONTWRITEBYTECODE=1           # nothing written into the source tree
ADASERVE=("$PY" -m adaserve)
FAILED=()

say() { printf '[gpu-check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# step NAME OUTFILE CMD...: run CMD with the step time limit; its stdout goes to OUTFILE ("-" = terminal)
step() {
  local name=$1 out=$2; shift 2
  if ((DRY)); then
    local words=() a
    for a in "$@"; do
      if [[ $a =~ ^[A-Za-z0-9_./:=,+-]+$ ]]; then words+=("$a"); else words+=("$(printf '%q' "$a")"); fi
    done
    [[ $out != - ]] && words+=(">" "$out")
    echo "${words[*]}"
    return 0
  fi
  say "$name"
  local t0=$SECONDS rc
  if [[ $out == - ]]; then
    timeout "$STEP_TIMEOUT" "$@"; rc=$?
  else
    timeout "$STEP_TIMEOUT" "$@" > "$out"; rc=$?
  fi
  say "$name: exit $rc in $((SECONDS - t0)) s"
  if ((rc != 0)); then
    FAILED+=("$name (exit $rc$( ((rc == 124)) && echo ", over ${STEP_TIMEOUT} s"))")
    [[ $out != - ]] && rm -f "$out"   # a partial result is not a result
  fi
  return 0
}

if ! ((DRY)); then
  mkdir -p "$WORK/cache" || exit 1
  trap 'rm -rf "$WORK"/ckpt-*' EXIT   # the checkpoints are large (and may sit in memory); results stay
  say "device $DEVICE, python $PY, work folder $WORK"
fi
((DRY)) || "$PY" -c 'import torch, transformers, safetensors; print("torch", torch.__version__, "transformers",
transformers.__version__, "cuda", torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else "")'

# 1. tests, and the steps against the weight-read floor
if wanted tests; then
  step "pytest -m cuda" - env ADASERVE_CUDA_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider -m cuda \
    tests/test_engine_cuda.py -s "${TESTS[@]}"
fi
if wanted floor; then
  step "weight floor" - "$PY" -m adaserve.runtime.weight_floor --shapes "${SHAPES// /,}" --device "$DEVICE" \
    --graphs "$FLOOR_GRAPHS" --json "$WORK/floor.json"
  if [[ ${PAGED_AB:-0} == 1 && $DEVICE == cuda* ]]; then  # the same steps with the paged attention kernel
    step "weight floor, paged attention" - env ADASERVE_PAGED_ATTENTION=1 "$PY" -m adaserve.runtime.weight_floor \
      --shapes "${SHAPES// /,}" --device "$DEVICE" --graphs on --json "$WORK/floor-paged.json"
  fi
fi

# 2-3. the first shape's checkpoint and profile, then adaserve run: vllm vs adaserve vs adaserve_plus
first=${SHAPES%% *}
BENCH_SHAPES=${BENCH_SHAPES:-$first}
if wanted runs; then
  step "checkpoint $first" - "$PY" -m adaserve.runtime.random_checkpoint --shape "$first" --out "$WORK/ckpt-$first"
  trace="$WORK/trace-rps4.8.json"
  profile="$WORK/profile-$first.json"
  step "profile $first" - "${ADASERVE[@]}" profile --model "$WORK/ckpt-$first" --device "$DEVICE" --drafter ngram \
    "${PROFILE_SIZE[@]}" --no-progress --out "$profile"
  step "trace generate" - "${ADASERVE[@]}" trace generate --kind rps --rps 4.8 --pool synthetic-text --out "$trace"
  with_profile=()
  if ((DRY)) || [[ -f $profile ]]; then with_profile=(--profile "$profile"); fi  # else a quick profile
  models=()
  [[ $PLAIN_RUNS == 1 ]] && models+=("$first")
  if [[ -n $CYCLES ]]; then
    step "checkpoint $first cycles" - "$PY" -m adaserve.runtime.random_checkpoint --shape "$first" \
      --cycles "$CYCLES" --out "$WORK/ckpt-$first-cycles"
    models+=("$first-cycles")
  fi
  for model in "${models[@]}"; do
    for scale in $RUN_SCALES; do
      for system in $SYSTEMS; do
        name=run-$system${model#"$first"}
        [[ $scale == 1 ]] || name=$name-x$scale
        # through engine_steps.py: every iteration's time is logged, so idle waits for arrivals stay out
        # of the per-iteration cost (wall time / iterations would count them)
        step "run $system $model x$scale" - "$PY" scripts/engine_steps.py "$WORK/$name.steps.jsonl" -- \
          run --trace "$trace" --system "$system" --model "$WORK/ckpt-$model" --time-scale "$scale" \
          --device "$DEVICE" --drafter ngram --max-requests "$RUN_REQUESTS" --ignore-eos --no-progress \
          "${RUN_SIZE[@]}" "${with_profile[@]}" --record-acceptance "$WORK/$name.acc.jsonl" --out "$WORK/$name"
      done
    done
  done
  # ab_run SUFFIX VAR=VALUE: the adaserve run of the last model at the first scale again, with one setting
  ab_run() {
    local model=${models[-1]} scale=${RUN_SCALES%% *} name
    name=run-adaserve${model#"$first"}-$1
    [[ $scale == 1 ]] || name=$name-x$scale
    step "run adaserve $model x$scale, $2" - env "$2" \
      "$PY" scripts/engine_steps.py "$WORK/$name.steps.jsonl" -- \
      run --trace "$trace" --system adaserve --model "$WORK/ckpt-$model" --time-scale "$scale" \
      --device "$DEVICE" --drafter ngram --max-requests "$RUN_REQUESTS" --ignore-eos --no-progress \
      "${RUN_SIZE[@]}" "${with_profile[@]}" --record-acceptance "$WORK/$name.acc.jsonl" --out "$WORK/$name"
  }
  [[ ${SPLIT_AB:-0} == 1 && $DEVICE == cuda* ]] && ab_run parts1 ADASERVE_GRAPH_PARTS=1     # no split steps
  [[ ${MASK_AB:-0} == 1 && $DEVICE == cuda* ]] && ab_run densemask ADASERVE_DEVICE_MASK=0   # dense host masks
  [[ ${PAGED_AB:-0} == 1 && $DEVICE == cuda* ]] && ab_run paged ADASERVE_PAGED_ATTENTION=1  # the Triton kernel
  if [[ ${SYNC_DEBUG:-0} == 1 ]]; then  # where the host waits for the GPU: counted, not timed
    step "sync sites adaserve $first" - "$PY" scripts/engine_steps.py "$WORK/diag-adaserve.steps.jsonl" --sync-debug \
      --trace-prefill 3 -- \
      run --trace "$trace" --system adaserve --model "$WORK/ckpt-$first" --device "$DEVICE" --drafter ngram \
      --max-requests 10 --ignore-eos --no-progress "${RUN_SIZE[@]}" "${with_profile[@]}" --out "$WORK/diag-adaserve"
  fi
fi

# 4. bench engine on each of BENCH_SHAPES, then (step "host") the first shape's host work
if wanted bench || wanted host; then
  for shape in $BENCH_SHAPES; do
    ckpt="$WORK/ckpt-$shape"
    wanted bench || [[ $shape == "$first" ]] || continue
    if [[ $shape != "$first" ]] || ! wanted runs; then  # else it was written in step 2
      step "checkpoint $shape" - "$PY" -m adaserve.runtime.random_checkpoint --shape "$shape" --out "$ckpt"
    fi
    hf=()
    [[ $shape == llama-3.1-8b ]] && hf=(--no-hf)   # transformers' twin would double the 8B load time
    for g in "${GRAPHS[@]}"; do
      wanted bench || break
      # the 8B shape's eager steps are in the weight-floor table; its eager bench would add minutes
      [[ $shape == llama-3.1-8b && $g == off ]] && continue
      step "bench engine $shape graphs $g" "$WORK/bench-$shape-graphs-$g.json" "${ADASERVE[@]}" bench engine \
        --model "$ckpt" --device "$DEVICE" --"$( [[ $g == on ]] && echo cuda-graphs || echo no-cuda-graphs)" \
        --prompts synthetic-text "${BENCH_SIZE[@]}" "${hf[@]}" --json
    done
    if [[ $shape == "$first" ]] && wanted host; then  # the host work per iteration, the device's forward between
      step "bench host $shape" "$WORK/bench-$shape-host-graphs-${GRAPHS[0]}.json" "${ADASERVE[@]}" bench engine \
        --model "$ckpt" --device "$DEVICE" --"$( [[ ${GRAPHS[0]} == on ]] && echo cuda-graphs || echo no-cuda-graphs)" \
        --only host "${HOST_SIZE[@]}" --json
      step "mask build" "$WORK/mask-build.md" "$PY" scripts/bench_mask_build.py --device "$DEVICE" "${MASK_SIZE[@]}"
    fi
  done
fi

# the table
if ((DRY)); then
  echo "$PY scripts/gpu_check_table.py $WORK"
  exit 0
fi
"$PY" scripts/gpu_check_table.py "$WORK" | tee "$WORK/table.md"
if ((${#FAILED[@]})); then
  say "FAILED: ${FAILED[*]}"
  exit 1
fi
say "all steps passed; results in $WORK"
