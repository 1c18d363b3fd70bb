"""What the decode loop reports: one `StepResult` per forward pass, one `GenerationStats` per
generation (summed by `StepTally`). The same `GenerationStats` crosses every boundary: the
gRPC and HTTP APIs encode it, their clients decode it back (`specdraft.local`).

Example: steps emitting 3, 1 and 4 tokens give new_tokens 8, steps 3, MAT 8 / 3 = 2.67.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from retriever.drafting.types import Source


@dataclass(frozen=True)
class StepResult:
    tokens: list[int]  # emitted this step: accepted draft tokens then the bonus (cut at EOS / max tokens)
    draft_nodes: int  # nodes verified in the forward (the chosen prefix of the draft)
    accepted_nodes: int  # emitted tokens that came from draft nodes
    accepted_sources: tuple[int, ...]  # [accepted_nodes] retriever Source of each accepted draft token
    draft_ns: int  # time in DraftSource.draft
    verify_ns: int  # tree inputs + forward + accept + commit
    drafted_nodes: int = 0  # nodes the drafter returned (before pruning and the prefix choice)


@dataclass(frozen=True)
class GenerationStats:
    """One generation's figures (see verifier.proto's GenerateStats for each field)."""

    prompt_tokens: int
    new_tokens: int  # up to the stop, an EOS token included
    steps: int
    mean_accepted_tokens: float
    draft_s: float
    verify_s: float
    tokens_per_s: float
    accepted_by_source: dict[int, int]  # retriever Source number -> accepted draft tokens
    draft_nodes: int
    accepted_draft_tokens: int
    wall_s: float

    def to_dict(self) -> dict:
        """JSON-able, sources by name ("context", "tenant", ...)."""
        out = {k: v for k, v in vars(self).items() if k != "accepted_by_source"}
        out["accepted_by_source"] = {source_name(k): v for k, v in self.accepted_by_source.items()}
        return out


def source_name(source: int) -> str:
    """A retriever source number as a name: 1 -> "context" (unknown numbers as digits)."""
    try:
        return Source(source).name.lower()
    except ValueError:
        return str(source)


@dataclass
class StepTally:
    """Sums over the steps of one generation; `generated` counts the tokens kept up to the stop."""

    steps: int = 0
    generated: int = 0
    draft_ns: int = 0
    verify_ns: int = 0
    draft_nodes: int = 0
    accepted: int = 0
    by_source: dict[int, int] = field(default_factory=dict)

    def add(self, step: StepResult) -> None:
        self.steps += 1
        self.draft_ns += step.draft_ns
        self.verify_ns += step.verify_ns
        self.draft_nodes += step.draft_nodes
        self.accepted += step.accepted_nodes
        for source in step.accepted_sources:
            self.by_source[int(source)] = self.by_source.get(int(source), 0) + 1

    def stats(self, prompt_tokens: int, wall_s: float) -> GenerationStats:
        return GenerationStats(prompt_tokens, self.generated, self.steps, self.generated / max(1, self.steps),
                               self.draft_ns / 1e9, self.verify_ns / 1e9, self.generated / max(wall_s, 1e-9),
                               dict(sorted(self.by_source.items())), self.draft_nodes, self.accepted, wall_s)
