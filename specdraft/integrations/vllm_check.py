"""Checks `SpecdraftProposer` against the proposer interface of a downloaded vLLM wheel, without
installing it (vLLM pulls a CUDA torch): the wheel's sources are parsed with `ast`.

    pip download --no-deps vllm==0.33.0 -d /tmp/vllm && python -m specdraft.integrations.vllm_check /tmp/vllm/vllm-*.whl

What is checked (vllm 0.33.0 layout): "custom_class" is a `SpeculativeMethod`;
`create_custom_proposer` builds the class with one positional argument (the VllmConfig); the V1
GPU model runner's `custom_class` branch calls `.propose(...)` with arguments our `propose` binds.
Exit status 0 when everything matches, 1 otherwise (the findings on stdout).
"""

from __future__ import annotations

import ast
import inspect
import sys
import zipfile
from dataclasses import dataclass

SPECULATIVE = "vllm/config/speculative.py"
FACTORY = "vllm/v1/spec_decode/custom_class_proposer.py"
RUNNER = "vllm/v1/worker/gpu_model_runner.py"


@dataclass(frozen=True)
class ProposeCall:
    """The runner's call: its positional argument expressions and keyword names."""

    positional: tuple[str, ...]
    keywords: tuple[str, ...]


@dataclass(frozen=True)
class Interface:
    version: str
    method_listed: bool  # "custom_class" in SpeculativeMethod
    init_positional: int  # positional arguments of user_class(...) in create_custom_proposer
    propose_call: ProposeCall | None  # the runner's custom_class propose call


def _sources(wheel: str) -> tuple[str, dict[str, str]]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        version = next(line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                       if line.startswith("Version:"))
        return version, {p: z.read(p).decode() for p in (SPECULATIVE, FACTORY, RUNNER)}


def _is_custom_class_test(node: ast.AST) -> bool:
    return (isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value == "custom_class"
                                                  for c in node.comparators))


def _propose_call(tree: ast.Module) -> ProposeCall | None:
    """The `.propose(...)` call in the body of the runner's `method == "custom_class"` branch."""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.If) and _is_custom_class_test(node.test)):
            continue
        for stmt in node.body:
            for call in ast.walk(stmt):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "propose":
                    return ProposeCall(tuple(ast.unparse(a) for a in call.args),
                                       tuple(k.arg for k in call.keywords if k.arg))
    return None


def _init_positional(tree: ast.Module) -> int:
    """Positional arguments of `user_class(...)` in create_custom_proposer (-1: not found)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "user_class":
            return len(node.args)
    return -1


def read_interface(wheel: str) -> Interface:
    version, src = _sources(wheel)
    return Interface(version, '"custom_class"' in src[SPECULATIVE] and "SpeculativeMethod" in src[SPECULATIVE],
                     _init_positional(ast.parse(src[FACTORY])), _propose_call(ast.parse(src[RUNNER])))


def mismatches(interface: Interface) -> list[str]:
    """What keeps SpecdraftProposer from plugging into this interface (empty: it fits)."""
    from specdraft.integrations.vllm import SpecdraftProposer

    found: list[str] = []
    if not interface.method_listed:
        found.append("'custom_class' is not a SpeculativeMethod")
    try:
        inspect.signature(SpecdraftProposer).bind(*[None] * interface.init_positional)
    except TypeError as e:
        found.append(f"SpecdraftProposer(...) with {interface.init_positional} positional arguments: {e}")
    call = interface.propose_call
    if call is None:
        found.append("no .propose(...) call in the runner's custom_class branch")
        return found
    expected = ("sampled_token_ids", "num_tokens_no_spec", "token_ids_cpu")
    if tuple(a.rsplit(".", 1)[-1] for a in call.positional) != expected:
        found.append(f"propose positional arguments must be {expected}, got {call.positional}")
    try:
        inspect.signature(SpecdraftProposer.propose).bind(None, *call.positional, **dict.fromkeys(call.keywords))
    except TypeError as e:
        found.append(f"SpecdraftProposer.propose{call.positional + call.keywords}: {e}")
    return found


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m specdraft.integrations.vllm_check VLLM_WHEEL", file=sys.stderr)
        return 2
    interface = read_interface(args[0])
    print(f"vllm {interface.version}: {interface}")
    found = mismatches(interface)
    for m in found:
        print(f"mismatch: {m}")
    print("SpecdraftProposer fits" if not found else f"{len(found)} mismatch(es)")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
