"""Batched speculative decoding with continuous batching (reference engine).

Per step: draft k tokens for every running request -> ONE target forward over
[pending, d_1..d_k] for the whole batch -> acceptance (greedy or rejection
sampling, vectorized) -> draft_extend -> one host sync for bookkeeping
(which requests finished, which join).  Prefill of joining requests happens
before ``begin_step`` and is not part of any hooked stage.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import random
import time
from time import perf_counter  # not via `time`: tests replace that module's clock
from typing import Any, Deque, Optional, Sequence

import numpy as np
import torch

from spec_metrics.demo.corpus import WORKLOADS, Corpus, load_corpus
from spec_metrics.demo.drafters import BatchView, Proposal
from spec_metrics.demo.models import GPT, to_device
from spec_metrics.demo.records import EngineConfig, Request, SpecCounters
from spec_metrics.demo.sampling import Acceptor, rejection_accept
from spec_metrics.demo.stages import EagerStages, GraphedStages

__all__ = ["Engine", "EngineConfig", "Request", "SpecCounters"]


class Engine:
    """Continuous-batching speculative decoder over a Poisson (or closed-loop)
    workload of corpus prompts.

    ``drafter``: a ``ModelDrafter`` or ``NgramDrafter`` (drafters.py protocol).
    ``hooks``: duck-typed stage hooks (begin_step/draft_*/verify_*/
    draft_extend_*/end_step), or None.  ``acceptor``: replaces rejection
    sampling for temperature > 0 (tests plug in a wrong rule); greedy
    (temperature 0) always uses exact argmax matching.
    """

    def __init__(self, target: GPT, drafter: Any, config: Optional[EngineConfig] = None,
                 hooks: Any = None, corpus: Optional[Corpus] = None,
                 acceptor: Optional[Acceptor] = None, seq_cap: Optional[int] = None) -> None:
        config = config or EngineConfig()
        if config.k < 1 or config.batch_size < 1 or config.prompt_len[0] < 1:
            raise ValueError("need k >= 1, batch_size >= 1 and prompts of >= 1 token")
        self.target, self.drafter, self.cfg, self.hooks = target, drafter, config, hooks
        self.corpus = corpus or load_corpus()
        self.eos_id = self.corpus.tokenizer.eos_id
        self.acceptor = acceptor or rejection_accept
        self.device = target.device
        k = config.k
        need = config.prompt_len[1] + config.max_new_tokens[1] + k
        self.seq_cap = seq_cap or need
        if self.seq_cap > target.cfg.max_seq:
            raise ValueError(f"prompt+max_new+k = {self.seq_cap} > model max_seq "
                             f"{target.cfg.max_seq}")
        self.tcache = target.new_cache(config.batch_size, self.seq_cap)
        drafter.allocate(config.batch_size, self.seq_cap)
        self.eager = EagerStages(target, drafter, self.tcache, self.acceptor)
        self.graphs: Optional[GraphedStages] = None  # replayed while the batch is full
        if config.cuda_graphs:
            if config.dynamic_k or config.plain or getattr(drafter, "never_drafts", False):
                raise ValueError("cuda_graphs=True replays a fixed K: not with dynamic_k "
                                 "or plain")
            if config.temperature > 0:
                raise ValueError("cuda_graphs=True supports greedy decoding (temperature 0)")
            self.graphs = GraphedStages(target, drafter, self.tcache, config.batch_size, k)
        self.counters = SpecCounters(k=k)
        self.rows: list[Request] = []
        self.row_groups: list[str] = []  # rows' workload classes, for verify_end(groups=)
        self.waiting: Deque[Request] = collections.deque()
        self.finished: Deque[Request] = collections.deque(maxlen=config.keep_finished)
        self.pending = torch.zeros(0, dtype=torch.long, device=self.device)
        self.lens = torch.zeros(0, dtype=torch.long, device=self.device)
        self._rng = random.Random(config.seed)  # workload: arrivals, prompts, lengths
        self._gen = torch.Generator(device=self.device).manual_seed(config.seed)
        self._n_created = 0
        self._next_arrival = self._draw_gap() if config.arrival_rate else 0.0
        self._t0: Optional[float] = None
        self._deadline: Optional[float] = None  # time.monotonic() bound set by run()
        self._vnow = 0.0
        self._spike_ms, self._spike_left = 0.0, None
        self._draft_slowdown = 1.0
        # A drafter that never drafts (NoDrafter) makes a plain engine whatever the config.
        self._plain = config.plain or getattr(drafter, "never_drafts", False)
        self.set_workloads(config.workloads)
        # (rows, decode seconds, emitted tokens) per step when a list: demo --baseline.
        self.step_log: Optional[list[tuple[int, float, int]]] = None

    # ------------------------------------------------------------ controls
    def collapse(self, sigma: Optional[float] = None) -> None:
        """Degrade the drafter now (re-noise with a big sigma / random n-grams)."""
        self.drafter.collapse(sigma)

    def weaken_drafter(self, share: float) -> None:
        """Swap in a weaker drafter: each draft token replaced at random with probability
        ``share`` (eager stages; captured CUDA graphs keep the drafter they captured)."""
        self.drafter.weaken(share)

    def restore(self) -> None:
        self.drafter.restore()

    def set_spike(self, ms: float, steps: Optional[int] = None) -> None:
        """Add ``ms`` of latency to the verify stage, for ``steps`` steps (None: until cleared)."""
        self._spike_ms, self._spike_left = float(ms), steps

    def clear_spike(self) -> None:
        self.set_spike(0.0)

    def set_draft_slowdown(self, factor: float) -> None:
        """From now on the draft stage takes ``factor`` times as long (a host sleep for the
        extra time, as a drafter on a contended device would); 1 restores it."""
        if factor < 1:
            raise ValueError(f"draft slowdown factor must be >= 1, got {factor}")
        self._draft_slowdown = float(factor)

    def submit(self, prompt: Sequence[int], max_new_tokens: int) -> Request:
        """Queue an explicit request (in addition to / instead of the Poisson stream)."""
        if not 1 <= len(prompt) <= self.cfg.prompt_len[1]:
            raise ValueError("prompt must be non-empty and <= config.prompt_len[1]")
        if max_new_tokens > self.cfg.max_new_tokens[1]:
            raise ValueError("max_new_tokens > config.max_new_tokens[1]")
        req = Request(f"req-{self._n_created:06d}", list(prompt), max_new_tokens, self.now())
        self._n_created += 1
        self.counters.requests_arrived += 1
        self.waiting.append(req)
        return req

    # --------------------------------------------------------------- clock
    def now(self) -> float:
        if self.cfg.clock == "virtual":
            return self._vnow
        if self._t0 is None:
            self._t0 = time.monotonic()
        return time.monotonic() - self._t0

    def _draw_gap(self) -> float:
        return self._rng.expovariate(self.cfg.arrival_rate) if self.cfg.arrival_rate else 0.0

    def _more_arrivals(self) -> bool:
        n = self.cfg.num_requests
        return n is None or self._n_created < n

    def set_workloads(self, workloads: Sequence[tuple[str, float]]) -> None:
        """Shares of the workload classes of requests generated from now on."""
        unknown = [name for name, _ in workloads if name not in WORKLOADS]
        if unknown or not workloads or any(share < 0 for _, share in workloads):
            raise ValueError(f"workloads must be (name, share >= 0) pairs with names in "
                             f"{sorted(WORKLOADS)}; got {list(workloads)}")
        total = sum(share for _, share in workloads)
        if total <= 0:
            raise ValueError("workload shares must not all be 0")
        self._workload_names = [name for name, _ in workloads]
        self._workload_cum = list(itertools.accumulate(share / total for _, share in workloads))

    def _new_request(self, arrival: float) -> None:
        lo, hi = self.cfg.prompt_len
        name = self._workload_names[0]
        if len(self._workload_names) > 1:  # one draw only when there is a choice
            index = bisect.bisect_right(self._workload_cum, self._rng.random())
            name = self._workload_names[min(index, len(self._workload_names) - 1)]
        prompt = WORKLOADS[name](self.corpus, self._rng, lo, hi)
        req = self.submit(prompt, self._rng.randint(*self.cfg.max_new_tokens))
        req.arrival_time, req.workload = arrival, name

    def _arrivals(self) -> None:
        now = self.now()
        if self.cfg.arrival_rate is None:  # closed loop: keep exactly enough queued
            while (len(self.rows) + len(self.waiting) < self.cfg.batch_size
                   and self._more_arrivals()):
                self._new_request(now)
            return
        while self._next_arrival <= now and self._more_arrivals():
            self._new_request(self._next_arrival)
            self._next_arrival += self._draw_gap()

    def _wait_for_arrival(self) -> bool:
        """Idle until the next arrival; False when the workload is exhausted."""
        if self.cfg.arrival_rate is None or not self._more_arrivals():
            return False
        if self.cfg.clock == "virtual":
            self._vnow = max(self._vnow, self._next_arrival)
        else:
            wait = self._next_arrival - self.now()
            if self._deadline is not None:  # never sleep past run(seconds=...)
                wait = min(wait, self._deadline - time.monotonic())
            time.sleep(max(0.0, wait))
        return True

    # ------------------------------------------------------------ batching
    def _admit(self) -> None:
        self._arrivals()
        if not self.rows and not self.waiting and self._wait_for_arrival():
            self._arrivals()
        new: list[Request] = []
        while self.waiting and len(self.rows) + len(new) < self.cfg.batch_size:
            req = self.waiting.popleft()
            req.start_time, req.context = self.now(), list(req.prompt)
            new.append(req)
        if not new:
            return
        # Prefill prompt[:-1]; prompt[-1] becomes the pending token.  Rows are
        # right-padded; padding lands past each row's length and is never read.
        # One host->device copy: columns are [len, pending, context...].
        n_ctx = max(len(r.prompt) for r in new) - 1
        host = torch.zeros((len(new), 2 + n_ctx), dtype=torch.long)
        for i, r in enumerate(new):
            host[i, :len(r.prompt) + 1] = torch.tensor([len(r.prompt) - 1] + r.prompt[-1:]
                                                       + r.prompt[:-1], dtype=torch.long)
        dev = to_device(host, self.device)
        toks, row0 = dev[:, 2:], len(self.rows)
        if n_ctx > 0:
            with torch.no_grad():
                zeros = torch.zeros(len(new), dtype=torch.long, device=self.device)
                self.target(toks, self.tcache, zeros, row0, n_ctx)
        self.drafter.prefill(row0, toks, n_ctx)
        self.rows += new
        self.row_groups += [r.workload for r in new]
        self.lens = torch.cat([self.lens, dev[:, 0]])
        self.pending = torch.cat([self.pending, dev[:, 1]])
        self.counters.requests_started += len(new)

    def _retire(self, done: list[int]) -> None:
        gone = set(done)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        keep_t = to_device(torch.tensor(keep, dtype=torch.long), self.device)
        self.tcache.compact(keep_t)
        self.drafter.compact(keep_t)
        self.lens, self.pending = self.lens[keep_t], self.pending[keep_t]
        for i in done:
            self.finished.append(self.rows[i])
        self.rows = [self.rows[i] for i in keep]
        self.row_groups = [self.row_groups[i] for i in keep]
        self.counters.requests_finished += len(done)

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> bool:
        """One speculative step over the running batch; False if nothing ran."""
        self._admit()
        if not self.rows:
            return False
        started = perf_counter()
        cfg, h, k = self.cfg, self.hooks, self.step_k()
        full = self.graphs is not None and len(self.rows) == cfg.batch_size
        stages = self.graphs if full else self.eager
        view = BatchView(self.pending, self.lens, max(len(r.context) for r in self.rows) - 1,
                         [r.context for r in self.rows], cfg.temperature, self._gen)
        stages.prepare(view)
        if h is not None:
            h.begin_step(request_ids=[r.id for r in self.rows], traceparents=None)
            h.draft_start()
        drafting = perf_counter()
        prop: Proposal = stages.draft(view, k)
        if self._draft_slowdown > 1:
            time.sleep((self._draft_slowdown - 1) * (perf_counter() - drafting))
        if h is not None:
            h.draft_end()
            h.verify_start()
        # Spikes wait for a step with drafts: a 300 ms plain step would dominate the few
        # plain steps the payoff estimate's measured baseline rests on (see the runbook).
        if self._spike_ms > 0 and k > 0:
            # Host sleep inside the stage: on CUDA the GPU idles for the same
            # time, which event-based timing also sees.
            time.sleep(self._spike_ms / 1000.0)
            if self._spike_left is not None:
                self._spike_left -= 1
                if self._spike_left <= 0:
                    self.clear_spike()
        verified = stages.verify(view, prop, k)
        if h is not None:
            drafted = k if prop.lengths is None else prop.lengths
            if cfg.report_groups:  # each request's workload class, kept in row order
                h.verify_end(verified.accepted, drafted, groups=self.row_groups)
            else:
                h.verify_end(verified.accepted, drafted)
            h.draft_extend_start()
        stages.extend(view, prop, verified)
        if h is not None:
            h.draft_extend_end()
        verified = stages.finish(view, prop, verified)
        assert verified.packed is not None and verified.lens_next is not None
        self.lens, self.pending = verified.lens_next, verified.next_token
        if h is not None:
            h.end_step()
        # The one host sync per step: continuous batching needs the emitted
        # tokens on the host to detect EOS / length and to admit new requests.
        packed = verified.packed.cpu()
        emitted = self.counters.emitted_tokens
        self._bookkeep(packed, prop, k)
        seconds = perf_counter() - started
        self.counters.decode_seconds += seconds
        if self.step_log is not None:
            self.step_log.append((packed.shape[0], seconds,
                                  self.counters.emitted_tokens - emitted))
        return True

    def step_k(self) -> int:
        """K for this step: the configured K, or with dynamic_k, K while at most half the
        batch runs, falling linearly to 0 (no drafts) when the batch is full; 0 for a plain
        engine and for every plain_every-th step (the measured baseline)."""
        k = self.cfg.k
        every = self.cfg.plain_every
        if self._plain or (every and self.counters.steps % every == every - 1):
            return 0
        if not self.cfg.dynamic_k:
            return k
        fill = len(self.rows) / self.cfg.batch_size
        return round(k * min(1.0, 2.0 * (1.0 - fill)))

    def _bookkeep(self, packed: torch.Tensor, prop: Proposal, k: int) -> None:
        # numpy on the host copy: a dozen tiny torch ops here cost more than the plain decode
        # step's own bookkeeping should (it is part of every step, speculative or not).
        c, B = self.counters, packed.shape[0]
        acc = packed.numpy()[:, 0]
        n_draft = (np.asarray(prop.lengths_host) if prop.lengths_host is not None
                   else np.full(B, k))
        pos = np.arange(self.cfg.k)
        c.steps += 1
        c.verified += B
        drafts = int(np.count_nonzero(n_draft))
        c.drafts += drafts
        c.steps_without_drafts += drafts == 0
        c.draft_tokens += int(n_draft.sum())
        accepted = int(acc.sum())
        c.accepted_tokens += accepted
        c.emitted_tokens += accepted + B
        if drafts:
            for p, (a_p, d_p) in enumerate(zip((acc[:, None] > pos).sum(0).tolist(),
                                               (n_draft[:, None] > pos).sum(0).tolist())):
                c.accepted_per_pos[p] += a_p
                c.draft_tokens_per_pos[p] += d_p
        rows, done, now = packed.tolist(), [], self.now()
        for i, (req, row) in enumerate(zip(self.rows, rows)):
            new = row[1:row[0] + 2]
            req.context += new
            room = req.max_new_tokens - len(req.output)
            keep = new[:room]
            if self.cfg.stop_at_eos and self.eos_id in keep:
                keep = keep[:keep.index(self.eos_id) + 1]
                req.finish_reason = "eos"
            elif len(keep) == room:
                req.finish_reason = "length"
            req.output += keep
            c.output_tokens += len(keep)
            if req.finish_reason is not None:
                req.finish_time = now
                done.append(i)
        if done:
            self._retire(done)
        if self.cfg.clock == "virtual":
            self._vnow += self.cfg.virtual_step_s

    # ----------------------------------------------------------------- run
    def idle(self) -> bool:
        return not self.rows and not self.waiting and not self._more_arrivals()

    def run(self, steps: Optional[int] = None, seconds: Optional[float] = None) -> SpecCounters:
        """Run ``steps`` steps and/or for ``seconds`` of wall time, or (neither
        given) until a finite workload is done.  Returns a counter snapshot."""
        if steps is None and seconds is None and self.cfg.num_requests is None:
            raise ValueError("endless workload: give steps= or seconds=")
        self._deadline = None if seconds is None else time.monotonic() + seconds
        ran = 0
        try:
            while steps is None or ran < steps:
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    break
                if self.step():
                    ran += 1
                elif self.idle():
                    break
        finally:
            self._deadline = None
        return self.counters.copy()
