"""`CostStore` on the llama.cpp backend (SmolLM2-135M Q4_1): a curve is measured once per key and
read back after, a broken or foreign file is measured again, an unwritable folder costs only the
keeping; the engine writes its refined curve back. And the policy in the engine: garbage drafts
stop being asked for, and the drafter hears how many nodes of its last tree were verified."""

import json
import logging
import time

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from retriever.drafting.types import DraftTree  # noqa: E402
from verifier.decoding.cost import CostModel  # noqa: E402
from verifier.decoding.cost_store import CostKey, CostStore  # noqa: E402
from verifier.decoding.engine import Engine  # noqa: E402
from verifier.decoding.llama_cpp import LlamaCppBackend  # noqa: E402
from verifier.decoding.model import ModelSpec, resolve_gguf  # noqa: E402


@pytest.fixture(scope="module")
def backend(smollm2):
    b = LlamaCppBackend(resolve_gguf(ModelSpec("smollm2")), max_nodes=16, n_ctx=1024, n_threads=2,
                        tokenizer=smollm2.tokenizer)
    yield b
    b.close()


def test_a_curve_is_measured_once_then_read(backend, tmp_path):
    store = CostStore(tmp_path / "costs")
    assert store.load(backend) is None
    measured = store.load_or_measure(backend, 17)
    assert backend.tiled and measured.tokens == tuple(range(1, len(measured.tokens) + 1))  # every size timed
    files = list((tmp_path / "costs").iterdir())
    assert [f.name for f in files] == [CostKey.of(backend).file_name()]
    data = json.loads(files[0].read_text())
    data["cost_ns"] = [c * 3 for c in data["cost_ns"]]  # what a later process reads is the file's curve
    files[0].write_text(json.dumps(data))
    read = CostStore(tmp_path / "costs").load_or_measure(backend, 17)
    assert read.tokens == measured.tokens and read.cost_ns == pytest.approx([c * 3 for c in measured.cost_ns])


def test_the_measured_baseline_is_kept_with_the_refined_curve(backend, tmp_path):
    store = CostStore(tmp_path)
    refined = CostModel((1, 4, 17), (2e6, 5e6, 9e6), baseline=((1, 17), (1e6, 4e6)))
    store.save(backend, refined)
    read = store.load(backend)
    assert read.baseline == ((1, 17), (1e6, 4e6)) and read.cost_ns == pytest.approx(refined.cost_ns)
    data = json.loads((tmp_path / CostKey.of(backend).file_name()).read_text())
    del data["baseline_tokens"], data["baseline_cost_ns"]  # a file of the first version 1 writer
    (tmp_path / CostKey.of(backend).file_name()).write_text(json.dumps(data))
    assert store.load(backend).baseline == (read.tokens, read.cost_ns)


def test_the_key_names_backend_model_precision_and_machine(backend, tmp_path):
    key = CostKey.of(backend)
    assert key.backend == "llama.cpp" and key.precision == backend.precision and key.model_bytes > 0
    assert key.model_mtime_ns > 0 and key.cpus >= 1 and key.path.endswith(".gguf")
    other = CostKey(**{**key.__dict__, "precision": "gguf cpu 1 threads"})
    assert other.file_name() != key.file_name()


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 1, "key": {"backend": "hf"}}),
                                     json.dumps({"version": 99}), json.dumps([1, 2])])
def test_a_broken_or_foreign_file_is_measured_again(backend, tmp_path, caplog, content):
    store = CostStore(tmp_path)
    (tmp_path / CostKey.of(backend).file_name()).write_text(content)
    with caplog.at_level(logging.WARNING):
        cost = store.load_or_measure(backend, 5)
    assert "unusable" in caplog.text and cost.tokens[0] == 1
    assert store.load(backend).cost_ns == cost.cost_ns  # rewritten


def test_an_unwritable_folder_costs_only_the_keeping(backend, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        cost = CostStore(blocker / "costs").load_or_measure(backend, 3)
    assert "not kept" in caplog.text and len(cost.tokens) >= 2


def test_the_engine_writes_its_refined_curve_back(backend, tmp_path):
    store = CostStore(tmp_path)
    store.save(backend, CostModel((1, 17), (1e6, 2e6)))  # far from this machine's truth
    engine = Engine(backend, max_nodes=16, cost_store=store, save_every=8)
    ids = backend.tokenizer.encode("def fibonacci(n):\n    ")
    steps = list(engine.generate(ids, 12))
    assert len(steps) == 12
    kept = store.load(backend)
    assert kept.tokens == engine.cost_model.tokens
    assert kept.cost_ns == pytest.approx(engine.cost_model.at(np.array(kept.tokens)).tolist())
    assert kept.cost_ns[0] != 1e6  # refined from the 12 plain steps


class Recorder:
    """Chains of `n` tokens (garbage or the truth) after a round trip of delay_s; records what the
    engine reports."""

    def __init__(self, truth: list[int], n: int, garbage: bool, delay_s: float = 0.0) -> None:
        self.truth, self.n, self.garbage, self.pos, self.delay_s = truth, n, garbage, 0, delay_s
        self.reports: list[tuple[int, int]] = []  # (verified_nodes, nodes of the tree returned before)
        self.last = 0
        self.ended_with: int | None = None

    def start(self, prompt_ids: list[int]) -> None:
        self.pos = 0

    def draft(self, new_tokens: list[int], max_nodes: int, verified_nodes: int = 0) -> DraftTree | None:
        self.reports.append((verified_nodes, self.last))
        time.sleep(self.delay_s)
        self.pos += len(new_tokens)
        chain = [5] * self.n if self.garbage else self.truth[self.pos:self.pos + self.n]
        self.last = len(chain)
        return DraftTree.chain(chain, np.linspace(0.99, 0.9, len(chain))) if chain else None

    def end(self, verified_nodes: int = 0) -> None:
        self.ended_with = verified_nodes


def test_garbage_drafts_stop_being_asked_for(backend):
    cost = CostModel((1, 2, 4, 8, 17), (10e6, 16e6, 27e6, 45e6, 92e6))  # this machine's llama.cpp SmolLM2 shape
    engine = Engine(backend, cost, max_nodes=16)
    ids = backend.tokenizer.encode("The three laws of")
    drafter = Recorder([], 6, garbage=True, delay_s=0.003)  # a remote retriever: 30% of a plain step
    steps = list(engine.generate(ids, 40, drafter=drafter))
    assert sum(len(s.tokens) for s in steps) == 40
    assert len(drafter.reports) + engine.policy.skipped <= len(steps) and engine.policy.skipped >= 10  # backed off
    assert sum(s.draft_nodes for s in steps[len(steps) // 2:]) <= 6 * 2  # calibrated away: few nodes verified late


def test_the_drafter_hears_which_prefix_was_verified(backend):
    ids = backend.tokenizer.encode("def fibonacci(n):\n    ")
    plain = [t for s in Engine(backend, CostModel.flat(), max_nodes=16).generate(ids, 30) for t in s.tokens]
    cost = CostModel((1, 2, 4, 8, 17), (10e6, 12e6, 14e6, 60e6, 200e6))  # 3 nodes pay, 7 do not
    engine = Engine(backend, cost, max_nodes=16, calibrate=False)
    drafter = Recorder(plain, 7, garbage=False)
    steps = list(engine.generate(ids, 30, drafter=drafter))
    assert [t for s in steps for t in s.tokens] == plain
    verified = [s.draft_nodes for s in steps if s.drafted_nodes]  # the steps that asked (none skipped after a miss)
    reports = [v for v, _ in drafter.reports[1:]]
    assert reports == verified[:len(reports)] and 0 < max(reports) < 7  # a prefix, never the whole chain
    assert drafter.ended_with == verified[-1]
