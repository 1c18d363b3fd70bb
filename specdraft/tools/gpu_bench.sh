#!/usr/bin/env bash
# The GPU run of issue 15, ready to go: SmolLM2-135M on a lent GPU machine (no network, at most 64 MiB
# carried per run, 15 minutes of device time per session, start-up included).
#
#   specdraft/tools/gpu_bench.sh prepare     here: fills the ignored folder .gpu/ (GGUF in 2 chunks, the gguf
#                                            wheel, the dev traces, the traces' tokenizer) and prints the plan
#   specdraft/tools/gpu_bench.sh plan        here: the two `run` calls, as JSON (command, carry, timeout_s)
#   specdraft/tools/gpu_bench.sh device-1    there (run 1): keeps chunk 0, installs gguf + this project (builds
#                                            the C++ core), runs the CUDA-only tests (graphs vs eager, tiny model)
#   specdraft/tools/gpu_bench.sh device-2    there (run 2, at once after run 1: the machine goes back ~30 s idle):
#                                            joins the chunks, checks the sha256, runs
#                                            `specdraft bench generate --device cuda` writing $OUT/gpu_bench.json
#   specdraft/tools/gpu_bench.sh selftest    here: prepare + join the chunks + the sha256 check, on the CPU
#
# The device steps run here too, on the CPU, for a check of everything but the GPU:
#   OUT=/tmp/o REMOTE=/tmp/r PYTHON3=.venv/bin/python DEVICE=cpu DTYPE=float32 WORKLOADS=code \
#   GPU_BENCH_LIMIT=1 GPU_BENCH_NEW_TOKENS=4 specdraft/tools/gpu_bench.sh device-1   (then device-2)
#
# Chunks are 47 MiB, not the 62 MiB of ../shared/gpu/README.md: a run carries the working tree (~2 MiB)
# plus the carried paths within 64 MiB; run 1 also carries the traces (1 MiB) and the gguf wheel, run 2 the
# traces' tokenizer (7 MiB): each run carries under 58 MiB (selftest checks it).
# Budget: start ~1-2 min, run 1 ~2 min (C++ build, tests), run 2 ~5 min (conversion, cost models, graph
# capture, torch.compile warm-up, 4 workloads x 3 prompts x 128 tokens x 5 decoders): ~9 min of 15.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
GPU="$HERE/.gpu"          # ignored (.gitignore): travels only when a run carries it
REMOTE="${REMOTE:-/tmp/specdraft-gpu}"  # on the device machine: survives between runs while it is held
CHUNK=47M
LIMIT="${GPU_BENCH_LIMIT:-3}"
NEW="${GPU_BENCH_NEW_TOKENS:-128}"
PY="${PY:-$HERE/.venv/bin/python}"  # here
PYTHON3="${PYTHON3:-python3}"  # there (the machine's torch 2.11 / transformers 5.17)
DEVICE="${DEVICE:-cuda}" DTYPE="${DTYPE:-bfloat16}" WORKLOADS="${WORKLOADS:-code,refactor,tests,chat}"

prepare() {
    local gguf
    gguf="$(cd "$HERE" && "$PY" -c 'from verifier.decoding.model import ModelSpec, resolve_gguf; print(resolve_gguf(ModelSpec()))')"
    rm -rf "$GPU" && mkdir -p "$GPU/run1/whl" "$GPU/run2/tok"
    split -b "$CHUNK" -d -a 2 "$gguf" "$GPU/smol."
    [ "$(ls "$GPU"/smol.* | wc -l)" -eq 2 ] || { echo "error: the GGUF must split into 2 chunks of $CHUNK" >&2; exit 1; }
    mv "$GPU/smol.00" "$GPU/run1/" && mv "$GPU/smol.01" "$GPU/run2/"
    sha256sum "$gguf" | cut -d' ' -f1 >"$GPU/run2/smol.sha256"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$GPU/run1/whl" gguf==0.19.0
    cp "${TRACES:-$HERE/../shared/traces/dev.jsonl}" "$GPU/run1/dev.jsonl"
    cp "${TOKENIZER:-$HERE/../shared/models/qwen2.5-coder-1.5b}/tokenizer.json" "$GPU/run2/tok/"
    du -sh "$GPU/run1" "$GPU/run2"
    plan
}

plan() {  # the `run` tool's calls, in order, with no pause between them
    cat <<EOF
[{"command": "bash specdraft/tools/gpu_bench.sh device-1", "carry": [".gpu/run1"], "timeout_s": 420},
 {"command": "bash specdraft/tools/gpu_bench.sh device-2", "carry": [".gpu/run2"], "timeout_s": 540}]
EOF
}

ensure_install() {  # gguf and this project (editable: builds the C++ core with the machine's nanobind/cmake)
    if "$PYTHON3" -c 'import gguf, retriever._core' 2>/dev/null; then return; fi
    "$PYTHON3" -m pip install -q --no-index --no-deps "$REMOTE"/whl/*.whl
    "$PYTHON3" -m pip install -q --no-index --no-deps --no-build-isolation -e "$HERE"
}

device_1() {
    : "${OUT:?device-1 runs on the device machine (the run tool sets OUT)}"
    mkdir -p "$REMOTE" && cp -r "$GPU/run1/." "$REMOTE/"
    ( nvidia-smi; "$PYTHON3" -c 'import torch, transformers; print(torch.__version__, transformers.__version__)' ) \
        >"$OUT/device.txt" 2>&1 || true
    ensure_install 2>&1 | tail -5
    cd "$HERE" && PYTHONUNBUFFERED=1 "$PYTHON3" -m pytest tests/verifier/decoding/test_hf_static.py -q -x \
        -p no:cacheprovider -k "captured or compaction or padded_inputs" 2>&1 | tee "$OUT/cuda_tests.log" | tail -5
}

device_2() {
    : "${OUT:?device-2 runs on the device machine (the run tool sets OUT)}"
    [ -f "$REMOTE/smol.00" ] || { echo "error: chunk 0 is gone (the machine was given back): rerun device-1" >&2; exit 1; }
    cat "$REMOTE/smol.00" "$GPU/run2/smol.01" >"$REMOTE/smol.gguf"
    echo "$(cat "$GPU/run2/smol.sha256")  $REMOTE/smol.gguf" | sha256sum -c - >&2
    ensure_install 2>&1 | tail -5
    cd "$HERE" && PYTHONUNBUFFERED=1 "$PYTHON3" -m specdraft.cli bench generate --variants --device "$DEVICE" \
        --dtype "$DTYPE" --workloads "$WORKLOADS" --model "$REMOTE/smol.gguf" --traces "$REMOTE/dev.jsonl" --tokenizer "$GPU/run2/tok" --limit "$LIMIT" \
        --max-new-tokens "$NEW" --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log" | grep -v Warning
}

selftest() {  # the CPU-side parts: prepare, then join the chunks as device-2 does and check the sha256
    prepare >/dev/null
    local joined; joined="$(mktemp)"
    cat "$GPU/run1/smol.00" "$GPU/run2/smol.01" >"$joined"
    echo "$(cat "$GPU/run2/smol.sha256")  $joined" | sha256sum -c -
    rm -f "$joined"
    local run size
    for run in run1 run2; do
        size="$(du -sm "$GPU/$run" | cut -f1)"
        [ "$size" -le 58 ] || { echo "error: $run carries ${size} MiB, more than 58" >&2; exit 1; }
    done
    echo "selftest ok: 2 chunks, sha256 matches, runs carry $(du -sm "$GPU/run1" | cut -f1) and ${size} MiB"
}

case "${1:-}" in
    prepare) prepare ;;
    plan) plan ;;
    device-1) device_1 ;;
    device-2) device_2 ;;
    selftest) selftest ;;
    *) sed -n '2,20p' "$0"; exit 2 ;;
esac
