#!/usr/bin/env bash
# One GPU round: tests natively on CUDA, then the benchmarks, then the table and plots.
#
# Run through the device tool from the repository root, with the peer wheels carried
# (make them here first with `bash benchmarks/fetch_wheels.sh`; the device has no network):
#
#   run(command="MINORSFT_GIT_SHA=<short sha> bash benchmarks/gpu_round.sh test,goal",
#       carry=[".whl"], timeout_s=600)
#   # copy the returned <gpu>-<date>-<sha>.json into benchmarks/results/, then:
#   run(command="MINORSFT_GIT_SHA=<short sha> GOAL_S=240 SWEEP_S=300 bash benchmarks/gpu_round.sh goal2,sweep",
#       carry=[".whl"], timeout_s=600)
#
# Stages (comma list, default "test,goal"; one call must end within 10 minutes):
#   test   pytest -q tests, natively on CUDA (TRITON_INTERPRET unset)          <= TEST_S
#   goal   bf16, V=128256, 16384 tokens, every mode and provider: the goal cases
#          minor_sft, minor_dpo (+ their *_reflogps forms)                      <= GOAL_S
#   goal2  the same shape for sft, token_logprobs, dpo, dpo_reflogps            <= GOAL_S
#   sweep  fwd_bwd over V x tokens (16384 tokens across V first, then V=128256
#          across tokens, then the rest, then the fp32 shape), then fwd and bwd at
#          16384 tokens over V; $SWEEP_CASES, rows already measured are skipped <= SWEEP_S
#   linear the fused linear path (bench_linear.py, H=4096, fwd_bwd): 16384 tokens,
#          V = 128256 first, then the other V                                   <= LINEAR_S
# (the time limits are environment variables; each bench run also stops starting new
# cases 90 s before its limit, and what was measured stays in the JSON)
# Results: the JSON is appended to row by row (a killed run leaves a valid file) at
# benchmarks/results/<gpu>-<yyyymmdd>-<sha>.json; when that file is already in the
# working tree (copied back from an earlier call the same day) the new rows join it.
# Everything that matters is copied to $OUT (at most 8 files come back):
#   the JSON, README.md, two PNGs, env.txt, pytest.log, bench.log.
set -u
STAGES="${1:-test,goal}"
TEST_S="${TEST_S:-200}"
GOAL_S="${GOAL_S:-330}"
SWEEP_S="${SWEEP_S:-330}"
LINEAR_S="${LINEAR_S:-240}"
SWEEP_CASES="${SWEEP_CASES:-minor_sft,sft,minor_dpo,dpo,token_logprobs}"
OUT="${OUT:-$PWD/gpu_round_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY="${PY:-python3}"

# Peer libraries from carried wheels (pure Python; torch/triton/transformers come with the image).
SITE=""
if compgen -G ".whl/*.whl" > /dev/null; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    SITE=/tmp/site
  else
    echo "WARNING: wheel install failed; liger/cce/trl rows will say unavailable"
  fi
else
  echo "note: no .whl/ carried; liger/cce/trl rows will say unavailable"
fi
# The package from source (minorsft/__init__.py maps kernels/ to minorsft.kernels). The
# peer wheels go on the path of the benchmarks only: the tests run against the image as
# it is (trl without its `datasets` dependency would break the HF integration tests).
TEST_PATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
  $PY - <<'EOF'
import importlib, torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_properties(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
for m in ("minorsft", "liger_kernel", "cut_cross_entropy", "trl.kernels"):
    try:
        mod = importlib.import_module(m)
        print("import ok:", m, getattr(mod, "__version__", ""))
    except Exception as e:  # noqa: BLE001
        print("import FAILED:", m, type(e).__name__, e)
print("torch.nn.functional.linear_cross_entropy:", hasattr(torch.nn.functional, "linear_cross_entropy"))
EOF
} 2>&1 | tee "$OUT/env.txt"

for stage in ${STAGES//,/ }; do
  case "$stage" in
    test)
      echo "== pytest (native CUDA), limit ${TEST_S}s"
      PYTHONPATH="$TEST_PATH" timeout "$TEST_S" $PY -m pytest -q -p no:cacheprovider tests 2>&1 \
        | tee "$OUT/pytest.log" | tail -40
      ;;
    goal|goal2)
      [ "$stage" = goal ] && cases=minor_sft,minor_dpo,minor_sft_reflogps,minor_dpo_reflogps \
                          || cases=sft,token_logprobs,dpo,dpo_reflogps
      echo "== $stage: goal shape, $cases, limit ${GOAL_S}s"
      timeout "$GOAL_S" $PY -m benchmarks.bench_logprobs --goal --cases "$cases" --time-budget-s $((GOAL_S - 90)) \
        2>&1 | tee -a "$OUT/bench.log"
      ;;
    sweep)
      echo "== sweep, limit ${SWEEP_S}s"
      half=$((SWEEP_S * 2 / 3))
      timeout "$half" $PY -m benchmarks.bench_logprobs --modes fwd_bwd --cases "$SWEEP_CASES" --skip-existing \
        --time-budget-s $((half - 90)) 2>&1 | tee -a "$OUT/bench.log"
      timeout $((SWEEP_S - half)) $PY -m benchmarks.bench_logprobs --modes fwd,bwd --tokens 16384 \
        --cases "$SWEEP_CASES" --fp32-shapes "" --skip-existing --time-budget-s $((SWEEP_S - half - 60)) \
        2>&1 | tee -a "$OUT/bench.log"
      ;;
    linear)
      echo "== linear path, limit ${LINEAR_S}s"
      timeout "$LINEAR_S" $PY -m benchmarks.bench_linear --tokens 16384 --vocabs 128256,32000,151936,262144 \
        --time-budget-s $((LINEAR_S - 90)) 2>&1 | tee -a "$OUT/bench.log"
      ;;
    *)
      echo "unknown stage $stage (test, goal, goal2, sweep, linear)"; exit 2 ;;
  esac
done

# Table and plots for every results file in the tree, then the GPU file(s) of this run to $OUT.
$PY -m benchmarks.plot 2>&1 | tail -2
f=$($PY -c "from benchmarks import utils as U; print(U.default_result_path('benchmarks/results', U.device_label(), U.git_sha()))")
if [ -f "$f" ]; then
  stem=$(basename "$f" .json)
  cp "$f" benchmarks/results/README.md "$OUT/"
  cp benchmarks/results/"$stem"-*.png "$OUT/" 2>/dev/null
else
  echo "no results file $f"
fi
ls -la "$OUT"
# The goal table is the first table of the README section of this file.
grep -A 8 "^Goal shape" benchmarks/results/README.md | head -12
