"""The engine's three decode stages, run eagerly or replayed as captured CUDA graphs.

Serving engines (sglang, vLLM, TensorRT-LLM) replay captured CUDA graphs for decode, so
the host enqueues a step in microseconds and the GPU sets the pace. Run eagerly, our
reference engine issues about a thousand kernel launches per step from Python and is
host-bound: the worst case for any host-side instrumentation, and not what operators run.

Both implementations have one method per stage, so the engine calls its hooks between
them either way. ``GraphedStages`` captures one graph per stage (draft, verify +
acceptance, draft_extend) for the full batch; attention always spans the whole KV cache
(positions past a row's length are masked), which makes every shape static. The engine
runs steps with fewer rows than the batch (a finite workload draining) eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from spec_metrics.demo.drafters import BatchView, ModelDrafter, Proposal
from spec_metrics.demo.models import GPT, KVCache
from spec_metrics.demo.sampling import Acceptor, greedy_accept, probs

__all__ = ["EagerStages", "GraphedStages", "Verified"]


@dataclass
class Verified:
    accepted: torch.Tensor  # [B] draft tokens kept per row
    next_token: torch.Tensor  # [B] the target's token after them
    # Set by `finish` (eager) or inside the verify graph:
    packed: Optional[torch.Tensor] = None  # [B, 1 + k + 1]: accepted, then emitted tokens
    lens_next: Optional[torch.Tensor] = None  # [B] cached positions after this step


def _emitted(tokens: torch.Tensor, accepted: torch.Tensor, next_token: torch.Tensor,
             lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Emitted tokens: drafts[:accepted] then next_token at slot `accepted`; packed with
    # `accepted` in front, it is the one tensor the engine copies to the host per step.
    out = torch.cat([tokens, next_token[:, None]], dim=1)
    out = out.scatter(1, accepted[:, None], next_token[:, None])
    return torch.cat([accepted[:, None], out], dim=1), lens + 1 + accepted


class EagerStages:
    """Every stage as plain torch calls: any batch size, drafter and temperature."""

    def __init__(self, target: GPT, drafter: object, cache: KVCache,
                 acceptor: Acceptor) -> None:
        self.target, self.drafter, self.cache, self.acceptor = target, drafter, cache, acceptor

    def prepare(self, view: BatchView) -> None:
        pass

    def draft(self, view: BatchView, k: int) -> Proposal:
        return self.drafter.propose(view, k)  # type: ignore[attr-defined]

    def verify(self, view: BatchView, prop: Proposal, k: int) -> Verified:
        inp = torch.cat([view.pending[:, None], prop.tokens], dim=1)  # [B, k+1]
        logits = self.target(inp, self.cache, view.lens, 0, view.kv_bound + k + 1)
        if view.temperature <= 0:
            accepted, nxt = greedy_accept(logits, prop.tokens, prop.lengths)
        else:
            accepted, nxt = self.acceptor(probs(logits, view.temperature), prop.q,
                                          prop.tokens, prop.lengths, view.generator)
        return Verified(accepted, nxt)  # new tensors every step

    def extend(self, view: BatchView, prop: Proposal, verified: Verified) -> None:
        self.drafter.extend(view, verified.accepted, prop)  # type: ignore[attr-defined]

    def finish(self, view: BatchView, prop: Proposal, verified: Verified) -> Verified:
        """The emitted tokens and new lengths, after the hooked stages (not timed)."""
        packed, lens_next = _emitted(prop.tokens, verified.accepted, verified.next_token,
                                     view.lens)
        return Verified(verified.accepted, verified.next_token, packed, lens_next)


class GraphedStages:
    """Captured draft / verify / draft_extend graphs for ``batch`` rows, greedy decoding.

    ``prepare`` copies the step's inputs into static buffers. Outputs are static tensors,
    valid until the next step's ``draft``: the three graphs share one memory pool, so that
    replay may reuse their memory. The engine reads them before (its one host copy, and
    ``prepare``), and the hooks' copy of the accepted counts is ordered before it: the
    engine's stream waits for that copy from ``end_step`` on. The graphs hold the
    addresses of both KV caches; ``prepare`` checks they are still the ones captured.
    """

    def __init__(self, target: GPT, drafter: ModelDrafter, cache: KVCache, batch: int,
                 k: int, warmup: int = 2) -> None:
        if target.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the target on a CUDA device")
        if not isinstance(drafter, ModelDrafter):
            raise ValueError("cuda_graphs=True supports the model drafter only (the n-gram "
                             "drafter looks tokens up on the host every step)")
        if cache.rows != batch:
            raise ValueError(f"KV cache has {cache.rows} rows, the graphs need {batch}")
        dev = target.device
        self.batch, self.k = batch, k
        self._drafter = drafter
        self._caches = (cache, drafter.cache)  # captured addresses: must stay allocated
        self.pending = torch.zeros(batch, dtype=torch.long, device=dev)
        self.lens = torch.zeros(batch, dtype=torch.long, device=dev)
        # kv_bound = seq_cap: the forward clamps kv_len to the cache, so every replay
        # attends over the whole (masked) cache and no shape depends on the step.
        view = BatchView(self.pending, self.lens, cache.seq_cap, [], 0.0,
                         torch.Generator(device=dev))
        seq_cap = cache.seq_cap

        def draft() -> None:
            self.tokens = drafter.propose(view, k).tokens

        def verify() -> None:
            inp = torch.cat([self.pending[:, None], self.tokens], dim=1)
            logits = target(inp, cache, self.lens, 0, seq_cap)
            accepted, nxt = greedy_accept(logits, self.tokens)
            self.verified = Verified(accepted, nxt,
                                     *_emitted(self.tokens, accepted, nxt, self.lens))

        def extend() -> None:
            drafter.extend(view, self.verified.accepted, Proposal(self.tokens, None))

        # Warm-up on a side stream (cuBLAS workspaces, allocator) as torch requires, then
        # capture into one memory pool; replays always run in capture order. Warm-up and
        # capture write into the caches; rows are prefilled before they are read.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):
                draft(), verify(), extend()
        torch.cuda.current_stream(dev).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        self._graphs = [self._capture(fn, pool) for fn in (draft, verify, extend)]

    @staticmethod
    def _capture(fn: Callable[[], None], pool: object) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
            fn()
        return graph

    def prepare(self, view: BatchView) -> None:
        """Copy this step's pending tokens and cached lengths into the static inputs."""
        if self._caches[1] is not self._drafter.cache:
            raise RuntimeError("the drafter's KV cache was reallocated after the CUDA graphs "
                               "were captured; build a new engine instead")
        self.pending.copy_(view.pending)
        self.lens.copy_(view.lens)

    def draft(self, view: BatchView, k: int) -> Proposal:
        self._graphs[0].replay()
        return Proposal(self.tokens, None)

    def verify(self, view: BatchView, prop: Proposal, k: int) -> Verified:
        self._graphs[1].replay()
        return self.verified

    def extend(self, view: BatchView, prop: Proposal, verified: Verified) -> None:
        self._graphs[2].replay()

    def finish(self, view: BatchView, prop: Proposal, verified: Verified) -> Verified:
        return verified  # computed inside the verify graph
