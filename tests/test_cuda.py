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
    assert hooks.collector.drops.counts["pending_overflow"] == 3
    hooks.flush()
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
