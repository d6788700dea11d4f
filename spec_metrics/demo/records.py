"""Plain records shared by the engine and its users (no torch needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class EngineConfig:
    batch_size: int = 8
    k: int = 4
    temperature: float = 0.0  # 0 = greedy acceptance, > 0 = rejection sampling
    arrival_rate: Optional[float] = 50.0  # Poisson requests/s; None = keep batch full
    num_requests: Optional[int] = None  # None = endless stream
    prompt_len: tuple[int, int] = (16, 64)  # uniform, inclusive
    max_new_tokens: tuple[int, int] = (32, 64)  # uniform per request, inclusive
    stop_at_eos: bool = True
    clock: str = "wall"  # "wall" or "virtual" (deterministic: virtual_step_s per step)
    virtual_step_s: float = 0.02
    seed: int = 0
    keep_finished: int = 10_000  # finished requests kept for inspection
    cuda_graphs: bool = False  # replay captured decode stages (CUDA, greedy, model drafter)
    # Dynamic speculation: K per step falls as the batch fills, from k at half the batch or
    # less to 0 (plain decode steps) when it is full.
    dynamic_k: bool = False
    # Plain greedy decoding: every step K = 0 (pair with drafters.NoDrafter); the baseline
    # that `spec-metrics demo --baseline` measures speculation against.
    plain: bool = False
    # Every plain_every-th step is a plain decode step (K = 0; 0 = never): a measured
    # baseline for the payoff estimate (spec_decode_plain_step_* series), at ~1/plain_every
    # of the speculation's gain.
    plain_every: int = 0
    # Workload classes of generated requests and their shares (corpus.WORKLOADS): e.g.
    # (("prose", 0.75), ("hex", 0.25)). Requests carry the class.
    workloads: tuple[tuple[str, float], ...] = (("prose", 1.0),)
    # Pass each request's workload class to the hooks as its group
    # (verify_end(groups=...); the hooks need a group_label).
    report_groups: bool = False


@dataclass
class Request:
    id: str
    prompt: list[int]
    max_new_tokens: int
    arrival_time: float
    start_time: Optional[float] = None
    finish_time: Optional[float] = None
    finish_reason: Optional[str] = None  # "length" | "eos"
    output: list[int] = field(default_factory=list)
    context: list[int] = field(default_factory=list)  # prompt + emitted (untruncated)
    workload: str = "prose"  # the workload class (corpus.WORKLOADS) it was drawn from


@dataclass
class SpecCounters:
    """Exact ground truth, counted on the host from the per-step sync."""

    k: int
    steps: int = 0
    verified: int = 0  # request-steps that went through verification
    drafts: int = 0  # request-steps with >= 1 draft token
    draft_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0  # accepted + 1 per verified request-step
    output_tokens: int = 0  # emitted tokens kept after max_new_tokens / EOS cut
    requests_arrived: int = 0
    requests_started: int = 0
    requests_finished: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # #req with accepted > p
    draft_tokens_per_pos: list[int] = field(default_factory=list)  # #req with drafts > p
    steps_without_drafts: int = 0  # verify passes in which no request had a draft token
    # Wall time of decode steps, prefill of joining requests excluded (demo --baseline).
    decode_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.accepted_per_pos = self.accepted_per_pos or [0] * self.k
        self.draft_tokens_per_pos = self.draft_tokens_per_pos or [0] * self.k

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_emitted_per_verify(self) -> float:
        return self.emitted_tokens / self.verified if self.verified else 0.0

    def copy(self) -> "SpecCounters":
        return SpecCounters(**{**self.__dict__,
                               "accepted_per_pos": list(self.accepted_per_pos),
                               "draft_tokens_per_pos": list(self.draft_tokens_per_pos)})
