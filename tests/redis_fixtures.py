"""A real redis-server for the tests: started on a free port in a temp dir, signalled at will.

`redis_server` (function scope) yields a running `RedisServer`; without the `redis-server`
binary the tests skip, except under CI (CI=true), where they fail: CI installs the Debian
package `redis-server` when missing.
"""

from __future__ import annotations

import os

import pytest

from specdraft.bench.redis_proc import REDIS_SERVER, RedisServer, free_port  # noqa: F401 - re-exported for tests


def require_redis_server() -> None:
    """Skips (fails under CI) when the redis-server binary is missing."""
    if REDIS_SERVER is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server must be installed in CI (apt-get install -y redis-server), got none on PATH")
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")


@pytest.fixture
def redis_server(tmp_path):
    require_redis_server()
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory).start()
    yield server
    server.kill()


@pytest.fixture
def make_redis(tmp_path):
    """Factory for servers with options: make_redis(persistent=True, extra=(...))."""
    require_redis_server()
    servers: list[RedisServer] = []

    def make(persistent: bool = False, extra: tuple[str, ...] = ()) -> RedisServer:
        directory = tmp_path / f"redis{len(servers)}"
        directory.mkdir()
        servers.append(RedisServer(directory, persistent, extra).start())
        return servers[-1]

    yield make
    for server in servers:
        server.kill()


@pytest.fixture(scope="session")
def redis_cluster_procs(tmp_path_factory):
    """One local Redis Cluster (3 masters, 3 replicas) for the whole session."""
    require_redis_server()
    from specdraft.bench.redis_proc import REDIS_CLI, RedisClusterProcs

    if REDIS_CLI is None:
        pytest.skip("redis-cli is not installed (apt-get install -y redis-tools)")
    cluster = RedisClusterProcs(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.kill_all()


@pytest.fixture
def redis_cluster(redis_cluster_procs):
    """The session's Redis Cluster, emptied (and back to cluster_state:ok) before the test."""
    redis_cluster_procs.wait_ok()
    redis_cluster_procs.flush()
    return redis_cluster_procs
