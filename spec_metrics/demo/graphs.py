"""CUDA graphs of the reference engine's three decode stages.

Serving engines (sglang, vLLM, TensorRT-LLM) replay captured CUDA graphs for decode, so
the host enqueues a step in microseconds and the GPU sets the pace. Run eagerly, our
reference engine issues about a thousand kernel launches per step from Python and is
host-bound: the worst case for any host-side instrumentation, and not what operators run.

One graph per stage (draft, verify + acceptance, draft_extend) keeps the stage boundaries
on the host, between replays, where the hooks record their timestamps. The graphs are
captured once for the full batch; attention always spans the whole KV cache (positions
past a row's length are masked), which makes every shape static. Steps with fewer rows
than the batch (a finite workload draining) run eagerly.
"""

from __future__ import annotations

from typing import Callable

import torch

from .drafters import BatchView, ModelDrafter, Proposal
from .models import GPT, KVCache
from .sampling import greedy_accept

__all__ = ["GraphedStages"]


class GraphedStages:
    """Captured draft / verify / draft_extend graphs for ``batch`` rows, greedy decoding.

    Inputs are copied into static buffers by ``load``; outputs are static tensors that the
    next replay overwrites (the hooks copy the accepted counts, stream-ordered, before it).
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
            inp = torch.cat([self.pending[:, None], self.tokens], dim=1)  # [B, k+1]
            logits = target(inp, cache, self.lens, 0, seq_cap)
            self.accepted, self.next_token = greedy_accept(logits, self.tokens)
            out = torch.cat([self.tokens, self.next_token[:, None]], dim=1)
            out = out.scatter(1, self.accepted[:, None], self.next_token[:, None])
            # [accepted, emitted tokens...]: the one tensor the engine copies to the host.
            self.packed = torch.cat([self.accepted[:, None], out], dim=1)
            self.lens_next = self.lens + 1 + self.accepted

        def extend() -> None:
            drafter.extend(view, self.accepted, Proposal(self.tokens, None))

        # Warm-up on a side stream (cuBLAS workspaces, allocator) as torch requires, then
        # capture into one memory pool; replays always run in capture order.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):
                draft(), verify(), extend()
        torch.cuda.current_stream(dev).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        self._graphs: list[torch.cuda.CUDAGraph] = []
        for fn in (draft, verify, extend):
            self._graphs.append(self._capture(fn, pool))
        self.draft, self.verify, self.extend = (g.replay for g in self._graphs)
        # Warm-up and capture wrote into the caches; the rows are prefilled before use.

    @staticmethod
    def _capture(fn: Callable[[], None], pool: object) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
            fn()
        return graph

    def load(self, pending: torch.Tensor, lens: torch.Tensor) -> None:
        """Copy this step's pending tokens and cached lengths into the static inputs."""
        if pending is not self.pending:
            self.pending.copy_(pending)
        if lens is not self.lens:
            self.lens.copy_(lens)

    def proposal(self) -> Proposal:
        return Proposal(self.tokens, None)
