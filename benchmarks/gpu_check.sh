#!/usr/bin/env bash
# CUDA checks and GPU figures in one call of a lent GPU machine (docs/performance.md has the GPU figures; docs/decoder.md the decoder's record).
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Runs one job at a time, each under its own time limit so that one failure never costs the
# others (about 9 minutes in all, inside one call of at most 10):
#   1. environment: GPU, driver, torch;
#   2. B-decode on the GPU (fp32 and bf16 weights against transformers), 150 s;
#   3. the default test suite with CUDA visible (device "auto" picks the GPU), 7 workers of 2 threads
#      (one process where pytest-xdist or pytest-timeout is missing: summary.txt says which),
#      -v so that every failure is named even when the limit stops it, 240 s;
#   4. the default demo on the GPU, the time left.
# Results (logs, demo.json, report.md) go to OUT_DIR/results.tgz and OUT_DIR/summary.txt.
#
# Never run CPU-heavy jobs beside each other there: on 2026-12-04 the suite (6 workers of 16
# OpenMP threads) beside two demos slowed the demos' training to 1-8 samples/s.
#
# The GPU image has torch but not every dependency: wheels in .whl/ (open_clip_torch, ftfy,
# wcwidth, soundfile, cffi, pycparser) are installed to /tmp/site first when the folder exists.
set -u
OUT_DIR=${1:?usage: gpu_check.sh OUT_DIR}
RES=${GPU_CHECK_RES:-/tmp/gpu-check}  # the tests point it elsewhere
rm -rf "$RES" && mkdir -p "$RES" "$OUT_DIR"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$RES/install.log" 2>&1 \
    || export PYTHONPATH=$PWD:${PYTHONPATH:-}
summary() { echo "$*" | tee -a "$RES/summary.txt"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, torchaudio, torchvision; print(torch.__version__, torchaudio.__version__,
torchvision.__version__, torch.cuda.get_device_name(0))"; nproc; } >"$RES/env.txt" 2>&1
cat "$RES/env.txt"

timed() {  # timed NAME LIMIT_S CMD...: run CMD under a limit, log to $RES/NAME.log, record rc and seconds
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$RES/$name.log" 2>&1
    local rc=$?
    summary "$name: rc=$rc in $((SECONDS - t0)) s"
}

timed decode 150 python3 -m benchmarks.bench_decode --device cuda
# -n (pytest-xdist) and --timeout (pytest-timeout) come from plugins the dev extra does not
# declare: without them pytest stopped at once with a usage error (rc=4)
if python3 -c "import xdist, pytest_timeout" >/dev/null 2>&1; then
    plugins="-n 7 --timeout=60"
    summary "pytest: 7 workers, 60 s a test (pytest-xdist and pytest-timeout installed)"
else
    plugins=""
    summary "pytest: one process, no limit a test (pytest-xdist or pytest-timeout not installed)"
fi
# shellcheck disable=SC2086  # $plugins: no flag or several
timed pytest 240 env OMP_NUM_THREADS=2 python3 -m pytest -o addopts="" -m "not slow" -p no:warnings -p no:benchmark \
    $plugins -v -rfE
grep -E "^(\[gw[0-9]+\] .*|[^ ]+::[^ ]+ )(FAILED|ERROR)" "$RES/pytest.log" >>"$RES/summary.txt"
left=$((560 - SECONDS))  # `timeout 0` would mean no limit at all
if [ "$left" -ge 60 ]; then
    timed demo "$left" python3 -m mmembed demo --out /tmp/runs/demo data.root=/tmp/data/shapes
else
    summary "demo: skipped (${left} s left)"
fi

for f in demo.json report.md metrics.jsonl; do
    [ -f "/tmp/runs/demo/$f" ] && cp "/tmp/runs/demo/$f" "$RES/demo-$f"
done
tail -n 3 "$RES/pytest.log" >>"$RES/summary.txt"
tar -czf "$OUT_DIR/results.tgz" -C "$RES" .
cp "$RES/summary.txt" "$OUT_DIR/summary.txt"
cat "$RES/summary.txt"
