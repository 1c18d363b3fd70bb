"""`specdraft generate`: prompts from the arguments or a JSONL file (`{"prompt": str}`,
`{"messages": [...]}` or `{"prompt_ids": [...]}`, optional `"id"`, `"max_new_tokens"`) through a
verifier: the one at `--verifier`, else one started in-process, drafting through `--retriever
host:port`, or a retriever started in-process over `--index` datastores; `--no-draft` for the
baseline (`--verifier-token-file`: the bearer token of an authenticated verifier; an in-process
verifier has no auth). Text goes to stdout (streamed), stats to stderr (`--json`: one JSON object
per prompt).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator

from retriever.client import ChannelSecurity, open_channel
from retriever.credentials import read_token_file
from specdraft.local import Generation, generate, in_process_retriever, in_process_verifier, verifier_stub
from verifier.api.cli import IN_PROCESS, model_args, retriever_security_args, settings_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="generate text for prompts (drafting through a retriever)")
    gen.add_argument("prompts", nargs="*", help="raw completion prompts (with --chat: user messages)")
    gen.add_argument("--jsonl", type=Path, help="prompts, one JSON object per line")
    gen.add_argument("--chat", action="store_true", help="send the argument prompts as chat user messages")
    gen.add_argument("--max-new-tokens", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--tenant", default="")
    gen.add_argument("--no-draft", action="store_true", help="plain decoding (the baseline)")
    gen.add_argument("--verifier", help="host:port of a running verifier (none: start one in-process)")
    gen.add_argument("--retriever", help="host:port of a running retriever")
    gen.add_argument("--index", action="append", default=[], help="datastore for an in-process retriever")
    gen.add_argument("--json", action="store_true", help="one JSON object (id, text, stats) per prompt")
    gen.add_argument("--verifier-token-file", metavar="FILE", help="file holding the bearer token for --verifier")
    model_args(gen)
    retriever_security_args(gen)
    gen.set_defaults(run=_generate)


def _requests(args: argparse.Namespace) -> list[tuple[str, object]]:
    from protos.specdraft.v1 import verifier_pb2 as pb

    items: list[tuple[str, dict]] = [(f"arg{i}", {"messages": [{"role": "user", "content": p}]} if args.chat
                                      else {"prompt": p}) for i, p in enumerate(args.prompts)]
    if args.jsonl:
        for n, line in enumerate(args.jsonl.read_text().splitlines()):
            if line.strip():
                obj = json.loads(line)
                items.append((str(obj.get("id", f"line{n + 1}")), obj))
    out = []
    for name, obj in items:
        sampling = pb.SamplingParams(temperature=args.temperature, top_k=args.top_k, stop=args.stop,
                                     max_new_tokens=int(obj.get("max_new_tokens", args.max_new_tokens)))
        if args.top_p is not None:
            sampling.top_p = args.top_p
        if args.seed is not None:
            sampling.seed = args.seed
        req = pb.GenerateRequest(sampling=sampling, tenant=args.tenant, no_draft=args.no_draft)
        if "messages" in obj:
            req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in obj["messages"])
        elif "prompt_ids" in obj:
            req.token_ids.ids.extend(int(t) for t in obj["prompt_ids"])
        elif "prompt" in obj:
            req.text = obj["prompt"]
        else:
            raise SystemExit(f"error: prompt {name} must have 'prompt', 'messages' or 'prompt_ids', got {sorted(obj)}")
        out.append((name, req))
    if not out:
        raise SystemExit("error: prompts must be given as arguments or with --jsonl, got none")
    return out


def _format_stats(g: Generation) -> str:
    s = g.stats
    return (f"{s.new_tokens} tokens in {s.steps} steps (MAT {s.mean_accepted_tokens:.2f}), "
            f"{s.tokens_per_s:.1f} tok/s, draft {s.draft_s * 1e3:.0f} ms, verify {s.verify_s * 1e3:.0f} ms, "
            f"accepted by source {s.to_dict()['accepted_by_source']}, finish: {g.finish_reason}")


def _generate(args: argparse.Namespace) -> int:
    requests = _requests(args)
    with _verifier_target(args) as stub:
        for name, request in requests:
            echo = None if args.json else (lambda text: print(text, end="", flush=True))
            g = generate(stub, request, on_text=echo)
            if args.json:
                print(json.dumps({"id": name, "text": g.text, "finish_reason": g.finish_reason, "stats": g.stats.to_dict()}),
                      flush=True)
            else:
                print(flush=True)
                print(f"[{name}] {_format_stats(g)}", file=sys.stderr, flush=True)
    return 0


@contextlib.contextmanager
def _verifier_target(args: argparse.Namespace) -> Iterator[object]:
    with contextlib.ExitStack() as stack:
        target = args.verifier
        if not target:
            retriever = args.retriever
            if not retriever and args.index and not args.no_draft:
                retriever = stack.enter_context(in_process_retriever([Path(p) for p in args.index]))
            settings = settings_from_args(args, host="127.0.0.1", port=0, http_port=-1, retriever=retriever or "",
                                 **IN_PROCESS)
            target = stack.enter_context(in_process_verifier(settings))
        elif args.verifier_token_file:
            yield _authenticated_stub(stack, target, args.verifier_token_file)
            return
        yield stack.enter_context(verifier_stub(target))


def _authenticated_stub(stack: contextlib.ExitStack, target: str, token_file: str) -> object:
    """A `VerifierStub` to `target` whose calls carry the token in `token_file` (plaintext channel)."""
    from protos.specdraft.v1 import verifier_pb2_grpc

    token = read_token_file(token_file, "--verifier-token-file")
    channel = stack.enter_context(open_channel(target, ChannelSecurity(token=token)))
    return verifier_pb2_grpc.VerifierStub(channel)
