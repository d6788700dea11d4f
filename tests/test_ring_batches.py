"""The worker consumes steps whose CUDA counts sit in landed device-ring rows as batches, like
host counts, in step order, with exact totals. The device is replaced by a host ring with the
interface `RingSlot` uses (rows land when the test says so), so this runs without a GPU;
tests/test_cuda.py covers the real ring on a device."""

from __future__ import annotations

import time

import numpy as np
import pytest

import spec_metrics
from spec_metrics._core.device_ring import RingSlot

from .conftest import sample_value, scrape

pytestmark = pytest.mark.worker
K = 4


class HostRing:
    """DeviceRing's consumer side on the host; `landed` rows are readable."""

    def __init__(self) -> None:
        self.rows: dict[int, np.ndarray] = {}
        self.landed = 0
        self.freed: set[int] = set()
        self.synced = 0

    def ready(self, seq: int) -> bool:
        return seq < self.landed

    def wait(self, seq: int) -> None:
        self.synced += 1
        self.landed = max(self.landed, seq + 1)

    def read(self, seq: int, length: int) -> np.ndarray:
        array = self.rows[seq][:length].copy()
        self.release(seq)
        return array

    def release(self, seq: int) -> None:
        assert seq not in self.freed, f"row {seq} freed twice"
        self.freed.add(seq)


def hand_over(hooks, ring: HostRing, seq: int, accepted: list[int], method=None) -> None:
    """What end_step() hands over for a step whose accepted counts went into ring row `seq`
    (K for the batch, request ids from begin_step)."""
    ring.rows[seq] = np.array(accepted, dtype=np.int64)
    slot = RingSlot(ring, seq, len(accepted), "accepted")  # type: ignore[arg-type]
    t = time.perf_counter_ns()
    times = [t, t + 1000, t + 1000, t + 3000, t + 3000, t + 4000]
    begin = (len(accepted), tuple(f"r{seq}-{j}" for j in range(len(accepted))), None, False)
    hooks._handed.append((seq, method, times, (slot, K, None, None), begin, None))


def workload(i: int) -> list[int]:
    return [i % 5, (i + 1) % 5, (i + 3) % 5]


def test_landed_rows_go_to_the_sinks_in_batches_in_order(registry, provider, exporter):
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracer_provider=provider,
                                         trace_ratio=0.25, max_draft_tokens=K)
    pending = hooks._pending
    consume_batch = pending.consume_batch
    assert consume_batch is not None
    batches: list[list[int]] = []

    def counting(method, raws, record_of):
        batches.append([raw[0] for raw in raws])
        consume_batch(method, raws, record_of)

    pending.consume_batch = counting
    ring = HostRing()
    steps, bad, other_method = 300, 150, 222
    accepted = 0
    with pending._lock:  # the worker waits: the test decides when steps are consumed
        for i in range(steps):
            counts = [1, 2, 6] if i == bad else workload(i)  # 6 > K: rejected when read
            accepted += 0 if i == bad else sum(counts)
            hand_over(hooks, ring, i, counts, method="draft_model" if i == other_method else None)
    ring.landed = 200
    hooks.poll()
    # Every landed step went in order; the rest wait for their rows, unread.
    consumed = [i for batch in batches for i in batch]
    assert len(pending) == 100
    assert ring.freed == set(range(200))
    ring.landed = steps
    hooks.flush()
    assert ring.synced == 0  # landed rows are read, never waited for
    consumed = [i for batch in batches for i in batch]
    assert consumed == sorted(consumed) and max(len(b) for b in batches) > 50
    # The step with another method goes on its own; all others were batched.
    assert set(consumed) == set(range(steps)) - {other_method}
    assert ring.freed == set(range(steps))
    families = scrape(registry)
    for method, steps_of in (("eagle", steps - 1), ("draft_model", 1)):
        assert sample_value(families, "spec_decode_step_duration_seconds",
                            "spec_decode_step_duration_seconds_count", method=method) == steps_of
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", method="eagle") == (
        accepted - sum(workload(other_method)))
    assert sample_value(families, "spec_decode_drafts", "spec_decode_drafts_total",
                        method="eagle") == 3 * (steps - 2)
    assert hooks.collector.drops.counts["accepted_exceeds_drafted"] == 1
    # Traced steps of a batch are built from their own record: request ids included.
    step_spans = [s for s in exporter.get_finished_spans() if s.name == "spec_decode.step"]
    assert step_spans
    for span in step_spans:
        ids = span.attributes["spec_decode.request_ids"]
        assert len(ids) == 3 and ids[0].endswith("-0")


def test_a_step_waiting_for_its_row_holds_back_the_ones_after_it(registry):
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False,
                                         max_draft_tokens=K)
    ring = HostRing()
    with hooks._pending._lock:
        for i in range(20):
            hand_over(hooks, ring, i, workload(i))
    ring.landed = 0
    hooks.poll()
    assert len(hooks._pending) == 20 and not ring.freed
    ring.landed = 10
    hooks.poll()
    assert len(hooks._pending) == 10 and ring.freed == set(range(10))
    hooks.flush()  # waits for the last rows (here: marks them landed)
    assert ring.freed == set(range(20))
    assert sample_value(scrape(registry), "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == sum(
        sum(workload(i)) for i in range(20))
