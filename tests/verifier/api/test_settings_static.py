"""The static-cache settings: `static_cache` auto|on|off, `graphs` (--no-graphs), `static_positions`,
from the environment and the flags, and `load(settings)` choosing the backend they name."""

from __future__ import annotations

import argparse

import pytest

from verifier.api.cli import model_args, settings_from_args
from verifier.api.settings import VerifierSettings as S


def test_auto_is_the_static_cache_on_cuda_with_graphs_only():
    assert not S().static_cache_on()  # cpu: the dynamic cache
    assert S(device="cuda").static_cache_on() and S(device="cuda:1").static_cache_on()
    assert not S(device="cuda", graphs=False).static_cache_on()  # --no-graphs: the eager dynamic fallback
    assert S(static_cache="on").static_cache_on()  # eager static on a CPU
    assert not S(device="cuda", static_cache="off").static_cache_on()
    assert not S(model="m.gguf", backend="llama.cpp", static_cache="on").static_cache_on()


def test_environment_and_flags():
    env = S.from_env({"SPECDRAFT_VERIFIER_GRAPHS": "0", "SPECDRAFT_VERIFIER_STATIC_CACHE": "on",
                      "SPECDRAFT_VERIFIER_STATIC_POSITIONS": "512"})
    assert (env.graphs, env.static_cache, env.static_positions) == (False, "on", 512)
    with pytest.raises(ValueError, match="SPECDRAFT_VERIFIER_STATIC_CACHE must be"):
        S.from_env({"SPECDRAFT_VERIFIER_STATIC_CACHE": "yes"})
    with pytest.raises(ValueError, match="SPECDRAFT_VERIFIER_STATIC_POSITIONS must be an integer >= 2"):
        S.from_env({"SPECDRAFT_VERIFIER_STATIC_POSITIONS": "1"})
    p = argparse.ArgumentParser()
    model_args(p)
    args = p.parse_args(["--device", "cuda", "--no-graphs", "--static-cache", "auto"])
    settings = settings_from_args(args, environ={})
    assert settings.graphs is False and not settings.static_cache_on()
    assert settings_from_args(p.parse_args([]), environ={}).graphs is True


def test_load_builds_the_backend_the_settings_name():
    from verifier.api.server import load
    from verifier.decoding.hf import HFBackend
    from verifier.decoding.hf_static import HFStaticBackend

    static = load(S(static_cache="on", static_positions=64))
    assert isinstance(static, HFStaticBackend) and static.max_positions == 64 and not static.graphs
    assert static.kind == "hf" and static.precision == "float32 cpu static eager"
    assert type(load(S())) is HFBackend
