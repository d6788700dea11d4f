"""CUDA paths: counts from device tensors and stage times from CUDA events, with zero device
synchronizations inside the hooks. Runs only where torch sees a GPU (the lent H100);
skipped elsewhere."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import spec_metrics  # noqa: E402

from .conftest import sample_value, scrape  # noqa: E402

SLEEP_CYCLES = 200_000_000  # ~0.1 s of device time on a ~2 GHz H100


def _step(hooks, accepted_fn, k, busy_cycles=0):
    hooks.begin_step()
    hooks.draft_start()
    hooks.draft_end()
    hooks.verify_start()
    if busy_cycles:
        torch.cuda._sleep(busy_cycles)  # device work the CPU does not wait for
    accepted = accepted_fn()
    hooks.verify_end(accepted, k)
    hooks.draft_extend_start()
    hooks.draft_extend_end()
    hooks.end_step()


def test_device_counts_are_read_later_without_any_sync(registry, provider):
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracer_provider=provider,
                                         trace_ratio=1.0, max_draft_tokens=4)
    source = torch.tensor([0, 1, 2, 3, 4, 4, 2, 1], device="cuda")
    hooks.warm_up_device(8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call below raises
    try:
        for _ in range(10):
            _step(hooks, lambda: source.clone(), 4, busy_cycles=SLEEP_CYCLES // 10)
        pending_while_busy = len(hooks._pending)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert pending_while_busy >= 1  # the copies had not landed: the hooks did not wait
    hooks.flush()
    families = scrape(registry)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == 10 * 17
    assert sample_value(families, "spec_decode_draft_tokens",
                        "spec_decode_draft_tokens_total") == 10 * 8 * 4
    for position, value in enumerate([7, 5, 3, 2]):
        assert sample_value(families, "spec_decode_accepted_tokens_per_position",
                            "spec_decode_accepted_tokens_per_position_total",
                            position=str(position)) == 10 * value
    assert sum(s.value for s in families["spec_metrics_dropped"].samples) == 0


def _copy_stream(hooks):
    streams = list(hooks._pinned._copy_streams.values())
    assert len(streams) == 1 and streams[0] != torch.cuda.current_stream()
    return streams[0]


def test_counts_are_copied_off_the_engine_stream_and_ordered_before_reuse(registry):
    """The copy runs on a side stream after the work queued before verify_end, and the
    engine's stream waits for it from end_step on. The side stream is held back by a
    sleep queued on it, so without that wait the engine's in-place overwrite after
    end_step would always land before the copy read the counts."""
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False,
                                         max_draft_tokens=4)
    hooks.warm_up_device(4)
    copies = _copy_stream(hooks)  # made at start-up, not in the first verify_end
    accepted = torch.zeros(4, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    for _ in range(5):
        with torch.cuda.stream(copies):
            torch.cuda._sleep(SLEEP_CYCLES // 10)  # the copy queued below waits for this
        _step(hooks, lambda: accepted.fill_(3), 4)
        accepted.fill_(0)  # the engine reuses its buffer (a graph's static output)
    hooks.flush()
    assert sample_value(scrape(registry), "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == 5 * 4 * 3


def test_a_tensor_freed_after_verify_end_is_not_reused_before_the_copy(registry):
    """record_stream: the engine drops its tensor right after verify_end and allocates a
    new one of the same size; the caching allocator must not hand it the same memory
    while the (delayed) copy has not read it yet."""
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False,
                                         max_draft_tokens=4)
    hooks.warm_up_device(4)
    copies = _copy_stream(hooks)
    torch.cuda.synchronize()
    for _ in range(5):
        hooks.begin_step()
        hooks.draft_start()
        hooks.draft_end()
        hooks.verify_start()
        accepted = torch.full((4,), 2, dtype=torch.int64, device="cuda")
        with torch.cuda.stream(copies):
            torch.cuda._sleep(SLEEP_CYCLES // 10)
        hooks.verify_end(accepted, 4)
        del accepted
        torch.zeros(4, dtype=torch.int64, device="cuda")  # same size: a candidate block
        hooks.end_step()
    hooks.flush()
    assert sample_value(scrape(registry), "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == 5 * 4 * 2


def test_bad_device_values_are_caught_when_read(registry):
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False,
                                         max_draft_tokens=4)
    _step(hooks, lambda: torch.tensor([1, 9], device="cuda"), 4)
    hooks.flush()
    assert hooks.collector.drops.counts["accepted_exceeds_drafted"] == 1


def test_pending_overflow_drops_the_oldest(registry):
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False,
                                         max_draft_tokens=4, max_pending_steps=2)
    hooks.warm_up_device(3)
    # Allocated before the sleep: a first cudaMalloc would itself wait for the device.
    ones = torch.ones(3, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES * 10)  # ~1 s: nothing after it completes meanwhile
    for _ in range(5):
        _step(hooks, lambda: ones, 4)
    # Whoever consumes first (the worker, or flush() here) finds all five waiting for the
    # sleeping device: the three oldest are dropped.
    hooks.flush()
    assert hooks.collector.drops.counts["pending_overflow"] == 3
    families = scrape(registry)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == 2 * 3


def test_cuda_timer_uses_device_time_without_sync(registry, provider, exporter):
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracer_provider=provider,
                                         trace_ratio=1.0, max_draft_tokens=4, timer="cuda")
    accepted = torch.tensor([1, 2], device="cuda")
    hooks.warm_up_device(2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            _step(hooks, lambda: accepted, 4, busy_cycles=SLEEP_CYCLES)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    hooks.flush()
    families = scrape(registry)
    stage = "spec_decode_stage_duration_seconds"
    verify_sum = sample_value(families, stage, stage + "_sum", stage="verify")
    draft_sum = sample_value(families, stage, stage + "_sum", stage="draft")
    # Enqueueing _sleep takes microseconds of CPU time; the device spends ~0.1 s per step.
    assert verify_sum > 3 * 0.02, verify_sum
    assert draft_sum < 0.01, draft_sum
    spans = {s.name: s for s in exporter.get_finished_spans()}
    verify = spans["spec_decode.verify"]
    assert (verify.end_time - verify.start_time) / 1e9 > 0.02
    step = spans["spec_decode.step"]
    assert step.start_time <= verify.start_time <= verify.end_time <= step.end_time


def test_rejected_device_input_returns_its_pinned_buffer(registry):
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False,
                                         max_draft_tokens=4)
    hooks.warm_up_device(8, buffers=4)
    free_before = sum(len(v) for v in hooks._pinned._free.values())
    accepted = torch.ones(4, dtype=torch.int64, device="cuda")
    for _ in range(20):  # draft_tokens of the wrong kind: rejected after the copy started
        _step(hooks, lambda: accepted, torch.tensor(4))
    torch.cuda.synchronize()
    hooks._pinned._reclaim()
    assert hooks.collector.drops.counts["wrong_type"] == 20
    assert sum(len(v) for v in hooks._pinned._free.values()) == free_before


def test_poll_publishes_pending_steps_while_the_engine_idles(registry):
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False,
                                         max_draft_tokens=4)
    hooks.warm_up_device(4)
    accepted = torch.tensor([1, 2, 3], device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    _step(hooks, lambda: accepted, 4)
    assert len(hooks._pending) == 1  # the copy is behind the sleep kernel
    torch.cuda.synchronize()  # the engine idles; the copy has landed
    hooks.poll()
    assert not hooks._pending
    families = scrape(registry)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == 6


def test_device_counts_with_request_groups_without_any_sync(registry):
    """Groups are host values: they wait with the step until the device counts land, and
    the per-group series are exact."""
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False,
                                         max_draft_tokens=4, group_label="adapter",
                                         max_groups=2)
    accepted = torch.tensor([0, 1, 2, 3, 4, 4], device="cuda")
    drafts = torch.tensor([4, 4, 2, 4, 4, 4], device="cuda")
    groups = ["a", "b", "a", "c", "b", "c"]  # c folds: 2 requests a step
    hooks.warm_up_device(8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            _step_with(hooks, accepted.clone(), drafts.clone(), groups,
                       busy_cycles=SLEEP_CYCLES // 10)
        pending_while_busy = len(hooks._pending)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert pending_while_busy >= 1
    hooks.flush()
    families = scrape(registry)
    for group, (accepted_tokens, draft_tokens) in {"a": (2, 6), "b": (5, 8),
                                                   "other": (7, 8)}.items():
        assert sample_value(families, "spec_decode_accepted_tokens",
                            "spec_decode_accepted_tokens_total",
                            adapter=group) == 5 * accepted_tokens
        assert sample_value(families, "spec_decode_draft_tokens",
                            "spec_decode_draft_tokens_total", adapter=group) == 5 * draft_tokens
    assert sample_value(families, "spec_metrics_label_values_folded",
                        "spec_metrics_label_values_folded_total", label="adapter") == 5 * 2
    assert sum(s.value for s in families["spec_metrics_dropped"].samples) == 0


def _step_with(hooks, accepted, drafts, groups, busy_cycles=0):
    hooks.begin_step()
    hooks.verify_start()
    if busy_cycles:
        torch.cuda._sleep(busy_cycles)
    hooks.verify_end(accepted, drafts, groups)
    hooks.end_step()


# ---- the worker's path: CUDA counts copied into device rows, read back in blocks ----------

def _ring(hooks):
    rings = list(hooks._rings._rings.values())
    assert len(rings) == 1
    return rings[0]


def _expected_totals(rows, k):
    """Accepted tokens, draft tokens and per-position accepted counts of host rows."""
    accepted = sum(int(sum(a)) for a, _ in rows)
    drafted = sum(int(sum(d)) if not isinstance(d, int) else d * len(a) for a, d in rows)
    positions = [sum(int((torch.as_tensor(a) > p).sum()) for a, _ in rows) for p in range(k)]
    return accepted, drafted, positions


@pytest.mark.worker
def test_ring_counts_are_exact_across_wraparound_and_reuse(registry):
    """More steps than the ring has rows, with per-request drafts: every step's counts and
    drafts go through a ring row, the engine overwrites its tensors right after verify_end
    (its stream orders that after our copy), and the totals are exact. Like an engine, the
    test synchronizes once a step and polls now and then (so the ring never fills)."""
    from spec_metrics._core.device_ring import ROWS

    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False,
                                         max_draft_tokens=4)
    hooks.warm_up_device(8)
    generator = torch.Generator().manual_seed(3)
    rows = []
    accepted = torch.zeros(8, dtype=torch.int32, device="cuda")
    drafts = torch.zeros(8, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    steps = ROWS // 2 + 100
    for step in range(steps):
        d = torch.randint(0, 5, (8,), generator=generator)
        a = (torch.rand(8, generator=generator) * (d + 1)).floor().to(torch.int64)
        rows.append((a.tolist(), d.tolist()))
        hooks.begin_step()
        hooks.draft_start()
        hooks.draft_end()
        hooks.verify_start()
        torch.cuda._sleep(SLEEP_CYCLES // 2000)  # some device work before the counts
        accepted.copy_(a, non_blocking=True)
        drafts.copy_(d, non_blocking=True)
        hooks.verify_end(accepted, drafts)
        accepted.fill_(7)  # reused at once: our copy is ahead of it on this stream
        drafts.fill_(0)
        hooks.draft_extend_start()
        hooks.draft_extend_end()
        hooks.end_step()
        torch.cuda.synchronize()
        if step % 32 == 31:
            hooks.poll()
    hooks.flush()
    ring = _ring(hooks)
    assert ring.written == 2 * steps > ROWS  # both tensors of every step, wrapped around
    families = scrape(registry)
    total_accepted, total_drafted, positions = _expected_totals(rows, 4)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == total_accepted
    assert sample_value(families, "spec_decode_draft_tokens",
                        "spec_decode_draft_tokens_total") == total_drafted
    for position, value in enumerate(positions):
        assert sample_value(families, "spec_decode_accepted_tokens_per_position",
                            "spec_decode_accepted_tokens_per_position_total",
                            position=str(position)) == value
    assert sum(s.value for s in families["spec_metrics_dropped"].samples) == 0


@pytest.mark.worker
def test_ring_full_wide_batches_and_float_counts_take_the_per_step_copy(registry):
    """No consumer for a while (its lock held): the first steps fill the ring, the rest are
    copied one by one; a batch wider than the rows and float counts are too. Exact."""
    from spec_metrics._core.device_ring import ROWS, RingSlot

    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False,
                                         max_draft_tokens=4)
    hooks.warm_up_device(4)
    accepted = torch.tensor([1, 2, 3, 4], device="cuda")
    wide = torch.ones(5, dtype=torch.int64, device="cuda")  # the rows hold 4 (warm-up)
    floats = torch.tensor([1.0, 2.0], device="cuda")
    torch.cuda.synchronize()
    kinds = []
    with hooks._pending._lock:  # the worker (and every other consumer) waits
        for _ in range(ROWS + 40):
            _step(hooks, lambda: accepted, 4)
            kinds.append(type(hooks._handed[-1][3][0]))
        _step(hooks, lambda: wide, 4)
        kinds.append(type(hooks._handed[-1][3][0]))
    assert kinds[:ROWS] == [RingSlot] * ROWS
    assert RingSlot not in kinds[ROWS:]
    _step(hooks, lambda: floats, 4)  # the ring has room again only once consumed
    hooks.flush()
    assert _ring(hooks).written == ROWS
    families = scrape(registry)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == (ROWS + 40) * 10 + 5 + 3
    assert sum(s.value for s in families["spec_metrics_dropped"].samples) == 0


@pytest.mark.worker
def test_ring_path_never_synchronizes_and_reports_bad_values(registry):
    """The worker reads ring rows without synchronizing; a bad value in a row is rejected
    when read, like the per-step path."""
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False,
                                         max_draft_tokens=4)
    hooks.warm_up_device(4)
    good = torch.tensor([1, 2], device="cuda")
    bad = torch.tensor([1, 9], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(20):
            counts = bad if i == 7 else good
            _step(hooks, lambda: counts, 4, busy_cycles=SLEEP_CYCLES // 100)  # noqa: B023
        hooks.poll()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    hooks.flush()
    assert hooks.collector.drops.counts["accepted_exceeds_drafted"] == 1
    assert sample_value(scrape(registry), "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == 19 * 3


@pytest.mark.worker
def test_landed_ring_rows_are_consumed_as_one_batch(registry, provider, exporter):
    """Steps whose counts sit in landed ring rows (one K, request ids from begin_step) go
    to the sinks as batches, like host counts: the totals are exact, traced steps keep
    their request ids, and a batch with a bad row falls back to one step at a time."""
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracer_provider=provider,
                                         trace_ratio=0.25, max_draft_tokens=4)
    hooks.warm_up_device(3)
    pending = hooks._pending
    batches: list[int] = []
    consume_batch = pending.consume_batch
    assert consume_batch is not None

    def counting(method, raws, record_of):
        batches.append(len(raws))
        consume_batch(method, raws, record_of)

    pending.consume_batch = counting
    rows = [torch.tensor([i % 5, (i + 1) % 5, (i + 3) % 5], device="cuda") for i in range(5)]
    bad = torch.tensor([1, 2, 6], device="cuda")  # 6 > K: rejected when read
    torch.cuda.synchronize()
    steps, accepted = 400, 0
    for i in range(steps):
        counts = bad if i == 150 else rows[i % 5]
        if i != 150:
            accepted += sum(rows[i % 5].tolist())
        hooks.begin_step(request_ids=[f"r{i}-{j}" for j in range(3)])
        hooks.draft_start()
        hooks.draft_end()
        hooks.verify_start()
        hooks.verify_end(counts, 4)
        hooks.draft_extend_start()
        hooks.draft_extend_end()
        hooks.end_step()
        if i % 50 == 49:
            torch.cuda.synchronize()  # the rows land; the next poll reads them in one block
            hooks.poll()
    hooks.flush()
    assert sum(batches) > steps // 2 and max(batches) > 1  # most steps came in batches
    families = scrape(registry)
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total") == accepted
    assert sample_value(families, "spec_decode_drafts",
                        "spec_decode_drafts_total") == 3 * (steps - 1)
    assert sample_value(families, "spec_decode_step_duration_seconds",
                        "spec_decode_step_duration_seconds_count") == steps
    assert hooks.collector.drops.counts["accepted_exceeds_drafted"] == 1
    step_spans = [s for s in exporter.get_finished_spans() if s.name == "spec_decode.step"]
    assert step_spans
    for span in step_spans:
        ids = span.attributes["spec_decode.request_ids"]
        assert len(ids) == 3 and ids[0].startswith("r") and ids[0].endswith("-0")
