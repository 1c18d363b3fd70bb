"""A local redis-server process for the tests and the log benchmark: a free port, a temp dir, signals.

`RedisServer(directory).start()`: `redis-server` on 127.0.0.1 (and a unix socket in the
directory), no RDB snapshots, AOF only when `persistent` (fsync always). `signal(SIGSTOP)`,
`kill()` (SIGKILL + reap) and `start()` again on the same port simulate outages.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process; `restart()` starts a new one on the same port and dir."""

    def __init__(self, directory: Path, persistent: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.dir, self.port, self.persistent, self.extra = directory, free_port(), persistent, extra
        self.socket_path = directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def start(self) -> "RedisServer":
        args = [REDIS_SERVER or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
                "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
                "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always", *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._pong():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text() if (self.dir / "redis.log").exists() else ""
                raise RuntimeError(f"redis-server must start on port {self.port}, got exit {self.proc.poll()}: {log}")
            time.sleep(0.01)
        return self

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
                return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")
        except OSError:
            return False

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (a SIGSTOPped server dies too) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> "RedisServer":
        self.kill()
        return self.start()


REDIS_CLI = shutil.which("redis-cli")


def cluster_port(taken: set[int]) -> int:
    """A free port P <= 55535 whose cluster bus port P + 10000 is free too (not in `taken`)."""
    for _ in range(1000):
        port = free_port()
        if port <= 55535 and port not in taken and port + 10000 not in taken and _free(port + 10000):
            return port
    raise RuntimeError("a free port pair (P, P + 10000) must exist for a cluster node, got none in 1000 tries")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class RedisClusterProcs:
    """A local Redis Cluster: `masters` masters with `replicas` replicas each, one redis-server per
    node (cluster-enabled, no persistence) in its own subdirectory of `directory`, made with
    `redis-cli --cluster create`. `node_timeout_ms` bounds failure detection (a killed master's
    replica is promoted about 2 node timeouts later). `restart(node)` brings a killed node back with
    its nodes.conf: it rejoins, as a replica of whoever holds its slots now.

        cluster = RedisClusterProcs(tmp_dir).start()
        url = cluster.url          # redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...
        cluster.master_of(b"key")  # the RedisServer serving the key's slot now
    """

    def __init__(self, directory: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.dir, self.node_timeout_ms = directory, node_timeout_ms
        self.masters_wanted, self.replicas = masters, replicas
        self.nodes: list[RedisServer] = []
        taken: set[int] = set()
        for i in range(masters * (1 + replicas)):
            node_dir = directory / f"node{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            self.nodes.append(RedisServer(node_dir, extra=(
                "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no",
                "--repl-diskless-sync-delay", "0")))
            self.nodes[-1].port = cluster_port(taken)
            taken |= {self.nodes[-1].port, self.nodes[-1].port + 10000}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> "RedisClusterProcs":
        for node in self.nodes:
            node.start()
        args = [REDIS_CLI or "redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            self.kill_all()
            raise RuntimeError(f"redis-cli --cluster create must succeed, got {done.returncode}: "
                               f"{done.stdout[-2000:]} {done.stderr[-2000:]}")
        self.wait_ok()
        return self

    def command(self, node: RedisServer, *args: str, timeout_s: float = 2.0) -> str:
        """One redis-cli command to `node`; its output ('' when the node is down)."""
        try:
            done = subprocess.run([REDIS_CLI or "redis-cli", "-p", str(node.port), *args], capture_output=True,
                                  text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return ""
        return done.stdout if done.returncode == 0 else ""

    def alive(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def wait_ok(self, timeout_s: float = 30.0) -> float:
        """Waits until every live node says cluster_state:ok with every slot served by a master and
        every live replica's link to its master is up; returns the seconds waited."""
        t0 = time.monotonic()
        while True:
            states = [self.command(n, "CLUSTER", "INFO") for n in self.alive()]
            links = [self.command(n, "INFO", "replication") for n in self.alive()]
            if (states and all("cluster_state:ok" in s and "cluster_slots_ok:16384" in s for s in states)
                    and all("role:master" in r or "master_link_status:up" in r for r in links)):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"redis cluster must reach cluster_state:ok in {timeout_s:g} s, got {states}")
            time.sleep(0.02)

    def masters(self) -> list[RedisServer]:
        """The live nodes whose ROLE is master."""
        return [n for n in self.alive() if self.command(n, "ROLE").startswith("master")]

    def master_of(self, key: bytes | str) -> RedisServer | None:
        """The live master serving `key`'s slot now; None while none does (a failover under way)."""
        key = key.decode() if isinstance(key, bytes) else key
        slot = int(self.command(self.alive()[0], "CLUSTER", "KEYSLOT", key).strip())
        for node in self.masters():
            for line in self.command(node, "CLUSTER", "NODES").splitlines():
                fields = line.split()
                if "myself" in fields[2]:
                    for part in fields[8:]:
                        lo, _, hi = part.partition("-")
                        if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                            return node
        return None

    def flush(self) -> None:
        """FLUSHALL on every master (replicas follow)."""
        for node in self.masters():
            self.command(node, "FLUSHALL")

    def kill(self, node: RedisServer) -> None:
        node.kill()

    def restart(self, node: RedisServer) -> None:
        node.start()

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()
