"""`specdraft bench abuse-http`: the verifier's HTTP API against abandoning clients (issue 18, item 3).

An in-process verifier (the model of `--model`, no retriever, HTTP and gRPC on free loopback
ports, the default `max_queued`) and raw-socket clients, each phase bounded:
1. unloaded: the next request's own time (`--next-tokens` tokens, the median of `--repeats`
   runs, send to answer) and one step's time (an unloaded `--long-tokens` generation without
   drafts: wall / steps, from the reply's `specdraft` stats);
2. abandon, `--rounds` times: `--abandoned` non-streamed `--long-tokens` requests (no drafts:
   one token a step), all closed `--abandon-after` seconds after the first step; then the next
   request -> its wait (send to answer; the median of the rounds) vs the target, one step plus
   its own time; and the steps the server ran between the closes and that answer (the step
   counter of /metrics; the most of the rounds);
3. queue: one long request holding the model, `max_queued` waiting, one more -> its status
   (429) and Retry-After.
Prints a table (`--json PATH`: also the result).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import statistics
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

PROMPT = "def inc(x):\n    return x + 1\n\n\ndef inc(x):\n    return x + 1\n\n\ndef inc(x):\n"


@dataclass(frozen=True)
class AbuseHttpResult:
    model: str
    abandoned: int
    abandon_after_s: float
    step_s: float  # one decoding step without drafts, unloaded
    own_s: float  # the next request's own time, unloaded (median)
    wait_s: float  # the next request's time right after the abandoned requests' clients left (median of rounds)
    waits_s: tuple[float, ...]  # each round's
    steps_after_close: int  # steps the server ran from the closes to the next answer (its own included; the most)
    next_steps: int  # the next request's own steps
    max_queued: int
    beyond_queue_status: int  # the answer to the request beyond the queue (429 expected)
    retry_after: str  # its Retry-After header

    @property
    def target_s(self) -> float:
        return self.step_s + self.own_s

    @property
    def within_target(self) -> bool:
        return self.wait_s < self.target_s

    def table(self) -> str:
        rows = [
            ("model", self.model),
            ("one step (no drafts, unloaded)", f"{self.step_s * 1e3:.1f} ms"),
            (f"next request alone ({self.next_steps} steps)", f"{self.own_s * 1e3:.1f} ms"),
            (f"next request after {self.abandoned} abandoned (closed after {self.abandon_after_s:g} s)",
             f"{self.wait_s * 1e3:.1f} ms (median of {len(self.waits_s)}: "
             f"{', '.join(f'{w * 1e3:.0f}' for w in self.waits_s)})"),
            ("target: one step + its own time", f"{self.target_s * 1e3:.1f} ms "
                                                 f"({'met' if self.within_target else 'MISSED'})"),
            ("steps from the closes to its answer (most)", f"{self.steps_after_close} (its own: {self.next_steps})"),
            (f"request beyond max_queued={self.max_queued}", f"HTTP {self.beyond_queue_status}, "
                                                             f"Retry-After {self.retry_after or '-'}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class _Client:
    """Requests to one verifier's HTTP API."""

    def __init__(self, port: int) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"

    def post(self, body: dict) -> tuple[int, Message, dict]:
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status, r.headers, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers, json.loads(e.read())

    def timed(self, body: dict) -> tuple[float, dict]:
        t0 = time.perf_counter()
        status, _, reply = self.post(body)
        if status != 200:
            raise SystemExit(f"error: the request must succeed, got HTTP {status}: {reply}")
        return time.perf_counter() - t0, reply

    def raw(self, body: dict) -> socket.socket:
        """A request on a socket of its own, never read (close it to leave)."""
        data = json.dumps(body).encode()
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: verifier\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        return sock

    def steps(self) -> int:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("specdraft_verifier_steps_total "):
                    return int(float(line.split()[1]))
        return 0

    def await_steps(self, above: int) -> None:
        deadline = time.monotonic() + 120
        while self.steps() <= above:
            if time.monotonic() > deadline:
                raise SystemExit("error: the verifier must start the long generation, got no step in 120 s")
            time.sleep(0.01)


def _abandon(client: _Client, args: argparse.Namespace, nxt: dict) -> tuple[float, int]:
    """Phase 2: the next request's wait and the steps from the closes to its answer."""
    start = client.steps()
    socks = [client.raw(_long(args)) for _ in range(args.abandoned)]
    client.await_steps(start)
    time.sleep(args.abandon_after)
    at_close = client.steps()
    for sock in socks:
        sock.close()
    wait_s, _ = client.timed(nxt)
    return wait_s, client.steps() - at_close


def _queue(client: _Client, max_queued: int, args: argparse.Namespace) -> tuple[int, str]:
    """Phase 3: the status and Retry-After of the request beyond the queue."""
    start = client.steps()
    holder = client.raw(_long(args))
    client.await_steps(start)
    waiting = [client.raw({"prompt": "x", "max_tokens": 1}) for _ in range(max_queued)]
    time.sleep(0.5)  # their admission (the server answers nothing to them yet)
    status, headers, _ = client.post({"prompt": "x", "max_tokens": 1})
    for sock in [holder, *waiting]:
        sock.close()
    return status, headers.get("Retry-After", "")


def _long(args: argparse.Namespace) -> dict:
    return {"prompt": PROMPT, "max_tokens": args.long_tokens, "temperature": 0, "no_draft": True}


def measure(args: argparse.Namespace) -> AbuseHttpResult:
    from verifier.api.server import create_server
    from verifier.api.settings import VerifierSettings

    settings = VerifierSettings(host="127.0.0.1", port=0, http_port=0, model=args.model, dtype=args.dtype,
                                device=args.device, max_new_tokens_cap=max(4096, args.long_tokens))
    server, _ = create_server(settings)
    try:
        client = _Client(server.http_port)
        nxt = {"prompt": "def f(", "max_tokens": args.next_tokens, "temperature": 0, "no_draft": True}
        client.timed(nxt)  # warm-up
        runs = [client.timed(nxt) for _ in range(args.repeats)]
        own_s, next_steps = statistics.median(t for t, _ in runs), runs[0][1]["specdraft"]["steps"]
        stats = client.timed({**_long(args), "max_tokens": 32})[1]["specdraft"]
        rounds = [_abandon(client, args, nxt) for _ in range(args.rounds)]
        waits = tuple(w for w, _ in rounds)
        status, retry_after = _queue(client, settings.max_queued, args)
        return AbuseHttpResult(args.model, args.abandoned, args.abandon_after, stats["wall_s"] / stats["steps"],
                               own_s, statistics.median(waits), waits, max(n for _, n in rounds), next_steps,
                               settings.max_queued, status, retry_after)
    finally:
        server.stop(0).wait(30)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="the verifier's model (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--abandoned", type=int, default=5, help="abandoned requests (default %(default)s)")
    p.add_argument("--abandon-after", type=float, default=1.0,
                   help="seconds after their first step the clients leave (default %(default)s)")
    p.add_argument("--long-tokens", type=int, default=400, help="max_tokens of an abandoned request")
    p.add_argument("--next-tokens", type=int, default=3, help="max_tokens of the next request")
    p.add_argument("--repeats", type=int, default=5, help="unloaded runs of the next request (median)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the abandon phase (median)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.abandoned <= 64 or args.abandon_after < 0 or not 1 <= args.rounds <= 20:
        raise SystemExit(f"error: --abandoned must be in [1, 64], --abandon-after >= 0 and --rounds in [1, 20], "
                         f"got {args.abandoned}, {args.abandon_after} and {args.rounds}")
    result = measure(args)
    print(result.table())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**dataclasses.asdict(result), "target_s": result.target_s,
                                               "within_target": result.within_target}, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
