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
