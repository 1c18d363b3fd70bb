"""The one settings loader (`retriever.config`): defaults <- environment <- overrides, parsing,
aliases, rules with "PREFIX_X must be Y, got Z" messages that never show a secret."""

from dataclasses import dataclass, field

import pytest

from retriever import config
from retriever.config import integer, one_of


@dataclass(frozen=True)
class Toy:
    port: int = 1
    ratio: float = 0.5
    on: bool = False
    paths: tuple[str, ...] = field(default=(), metadata={"env": "PATHS_DIRS"})
    mode: str = field(default="a", metadata={"aliases": ("SHARED_MODE",), "lower": True})
    secret: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        config.check(self, {"port": (integer(0, 9), "an integer in [0, 9]"), "mode": one_of("a", "b"),
                            "secret": (lambda v: v != "leak", "not leak")}, "TOY_")


def test_defaults_then_environment_then_overrides():
    assert config.load(Toy, "TOY_", {}) == Toy()
    env = {"TOY_PORT": "7", "TOY_RATIO": "0.25", "TOY_ON": "yes", "TOY_PATHS_DIRS": "a:b", "SHARED_MODE": "B"}
    s = config.load(Toy, "TOY_", env)
    assert (s.port, s.ratio, s.on, s.paths, s.mode) == (7, 0.25, True, ("a", "b"), "b")
    assert config.load(Toy, "TOY_", {**env, "TOY_MODE": "a"}).mode == "a"  # the prefixed name wins over an alias
    assert config.load(Toy, "TOY_", env, port=3, paths=["c"], ratio=None) == Toy(3, 0.25, True, ("c",), "b")
    assert config.env_name(Toy, "TOY_", "paths") == "TOY_PATHS_DIRS"


@pytest.mark.parametrize("env, message", [
    ({"TOY_PORT": "x"}, "TOY_PORT must be an integer, got 'x'"),
    ({"TOY_RATIO": "1/2"}, "TOY_RATIO must be a number, got '1/2'"),
    ({"TOY_ON": "maybe"}, "TOY_ON must be 0 or 1 (or true/false), got 'maybe'"),
    ({"TOY_PORT": "12"}, "TOY_PORT must be an integer in [0, 9], got 12"),
    ({"TOY_MODE": "c"}, "TOY_MODE must be one of a, b, got 'c'"),
    ({"TOY_SECRET": "leak"}, "TOY_SECRET must be not leak, got a value not shown (it may hold a secret)"),
])
def test_bad_values_are_refused_naming_the_variable(env, message):
    with pytest.raises(ValueError) as e:
        config.load(Toy, "TOY_", env)
    assert str(e.value) == message and "leak" not in str(e.value).replace("not leak", "")


def test_both_services_load_through_it():
    from retriever.service.settings import RetrieverSettings
    from verifier.api.settings import VerifierSettings

    r = RetrieverSettings.from_env({"SPECDRAFT_INDEX_DIRS": "x:y", "SPECDRAFT_PORT": "0"}, host="127.0.0.1")
    assert (r.indexes, r.port, r.host) == (("x", "y"), 0, "127.0.0.1")
    v = VerifierSettings.from_env({"SPECDRAFT_CACHE_DIR": "/c", "SPECDRAFT_VERIFIER_MAX_NODES": "8"})
    assert (v.cache_dir, v.max_nodes, v.model_spec().cache_dir) == ("/c", 8, "/c")
    with pytest.raises(ValueError, match="SPECDRAFT_VERIFIER_PORT must be an integer in"):
        VerifierSettings.from_env({"SPECDRAFT_VERIFIER_PORT": "70000"})


def test_one_default_per_setting():
    from retriever.drafting.types import DrafterConfig
    from retriever.service.settings import RetrieverSettings
    from verifier.api.settings import VerifierSettings
    from verifier.decoding.model import ModelSpec

    drafter, settings = DrafterConfig(), RetrieverSettings()
    for name in ("max_sessions", "session_idle_s", "tenant_token_budget", "max_context_tokens"):
        assert getattr(settings, name) == getattr(drafter, name)
    assert settings.drafter_config().tenant_token_budget == drafter.tenant_token_budget
    spec = VerifierSettings().model_spec()
    assert (spec.source, spec.dtype, spec.device) == (ModelSpec().source, ModelSpec().dtype, ModelSpec().device)
