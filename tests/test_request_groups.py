"""Acceptance by request group: `group_label` / `max_groups` and verify_end(groups=...).

Exact per-group values of every grouped family after a known sequence of steps, folding
beyond max_groups, the "default" group, bad groups (counted, or raised in strict mode),
the byte-equality of the fast writer with prometheus_client for a grouped collector, and
the deferred paths (batch_steps, device counts that land later, poll/flush)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client import exposition as classic
from prometheus_client.openmetrics import exposition as openmetrics

import spec_metrics
from spec_metrics import StrictModeError
from spec_metrics._core import hooks as hooks_module
from spec_metrics._core.inputs import DeviceArray, _check_array
from spec_metrics._prometheus.exposition import render
from spec_metrics.catalog import GROUPED_METRICS, METRICS

from .conftest import sample_value, scrape

ENCODERS = (openmetrics.generate_latest, classic.generate_latest)


def grouped_hooks(registry, method="eagle", **options):
    options.setdefault("group_label", "adapter")
    options.setdefault("max_draft_tokens", 4)
    options.setdefault("tracing", False)
    return spec_metrics.SpecDecodeHooks(method, registry=registry, labels={"engine": "e"},
                                        **options)


def verify(hooks, accepted, draft_tokens, groups=None):
    hooks.verify_start()
    hooks.verify_end(accepted, draft_tokens, groups)
    hooks.end_step()


def value(families, family, sample, **labels):
    return sample_value(families, family, sample, engine="e", **labels)


def groups_of(families, family="spec_decode_drafts", **labels):
    return [s.labels["adapter"] for s in families[family].samples
            if all(s.labels.get(k) == v for k, v in labels.items())]


def check_group(families, group, *, draft_lengths, accepted_lengths, steps=None):
    """Every grouped family of `group`, against the requests' draft and accepted lengths
    (the accepted ones of requests that had drafts), written out by hand in each test."""
    labels = {"method": "eagle", "adapter": group}
    for family, lengths in (("spec_decode_draft_length", draft_lengths),
                            ("spec_decode_accepted_length", accepted_lengths)):
        for le in range(5):
            assert value(families, family, family + "_bucket", le=f"{float(le)}",
                         **labels) == sum(n <= le for n in lengths), (group, family, le)
        assert value(families, family, family + "_bucket", le="+Inf",
                     **labels) == len(lengths)
        assert value(families, family, family + "_count", **labels) == len(lengths)
        assert value(families, family, family + "_sum", **labels) == sum(lengths)


def test_every_grouped_family_exact_per_group(registry) -> None:
    hooks = grouped_hooks(registry, max_groups=3)
    # lora-a: requests 0, 2, 3; lora-b: request 1. Request 2 had no drafts.
    verify(hooks, [2, 0, 0, 4], [4, 2, 0, 4], ["lora-a", "lora-b", "lora-a", "lora-a"])
    verify(hooks, [1, 1], 2, np.array(["lora-b", "lora-c"]))           # K for the batch
    verify(hooks, [0, 0, 0], 0, ("lora-a", "lora-c", "lora-a"))        # a plain step
    families = scrape(registry)
    # lora-a: draft lengths 4, 0, 4, 0, 0; accepted (requests with drafts) 2, 4.
    # lora-b: draft lengths 2, 2; accepted 0, 1.  lora-c: draft lengths 2, 0; accepted 1.
    check_group(families, "lora-a", draft_lengths=[4, 0, 4, 0, 0], accepted_lengths=[2, 4])
    check_group(families, "lora-b", draft_lengths=[2, 2], accepted_lengths=[0, 1])
    check_group(families, "lora-c", draft_lengths=[2, 0], accepted_lengths=[1])
    want = {  # drafts, draft tokens, accepted tokens, emitted tokens (accepted + requests)
        "lora-a": (2, 8, 6, 6 + 5),
        "lora-b": (2, 4, 1, 1 + 2),
        "lora-c": (1, 2, 1, 1 + 2),
    }
    names = ("spec_decode_drafts", "spec_decode_draft_tokens", "spec_decode_accepted_tokens",
             "spec_decode_emitted_tokens")
    for group, values in want.items():
        for name, expected in zip(names, values):
            assert value(families, name, name + "_total", method="eagle",
                         adapter=group) == expected, (group, name)
    per_position = {  # draft tokens, accepted tokens at positions 0..3
        "lora-a": ([2, 2, 2, 2], [2, 2, 1, 1]),
        "lora-b": ([2, 2, 0, 0], [1, 0, 0, 0]),
        "lora-c": ([1, 1, 0, 0], [1, 0, 0, 0]),
    }
    for group, (drafted, accepted) in per_position.items():
        for position in range(4):
            for name, expected in (("spec_decode_draft_tokens_per_position", drafted),
                                   ("spec_decode_accepted_tokens_per_position", accepted)):
                assert value(families, name, name + "_total", method="eagle", adapter=group,
                             position=str(position)) == expected[position], (group, name)
    # The rest stays per method, without the group label.
    assert value(families, "spec_decode_steps_without_drafts",
                 "spec_decode_steps_without_drafts_total", method="eagle") == 1
    assert value(families, "spec_decode_step_duration_seconds",
                 "spec_decode_step_duration_seconds_count", method="eagle") == 3
    for spec in METRICS:
        for sample in families[spec.family].samples:
            assert ("adapter" in sample.labels) == spec.grouped, (spec.name, sample)
    assert value(families, "spec_metrics_label_values_folded",
                 "spec_metrics_label_values_folded_total", label="adapter") == 0
    assert groups_of(families) == ["lora-a", "lora-b", "lora-c"]  # first seen first


def test_groups_beyond_max_groups_fold_into_other_and_are_counted(registry) -> None:
    first = grouped_hooks(registry, max_groups=2)
    # a and b take the two slots; c (2 requests) folds; "other" itself takes no slot and
    # is not folded.
    verify(first, [0, 1, 2, 2, 1], 2, ["a", "b", "c", "c", "other"])
    # No groups: the requests count under "default", which folds too (3 requests).
    verify(first, [2, 0, 1], 2)
    ngram = spec_metrics.SpecDecodeHooks("ngram", collector=first.collector, tracing=False,
                                         group_label="adapter", max_draft_tokens=4)
    verify(ngram, [1, 1], 1, ["z", "a"])  # the table is the collector's: z folds, a is kept
    families = scrape(registry)
    assert value(families, "spec_metrics_label_values_folded",
                 "spec_metrics_label_values_folded_total", label="adapter") == 2 + 3 + 1
    assert value(families, "spec_metrics_label_values_folded",
                 "spec_metrics_label_values_folded_total", label="method") == 0
    assert groups_of(families, method="eagle") == ["a", "b", "other"]
    assert groups_of(families, method="ngram") == ["a", "other"]
    # other (eagle): c, c, other (accepted 2, 2, 1) then default (2, 0, 1), all K = 2.
    other = {"spec_decode_drafts": 6, "spec_decode_draft_tokens": 12,
             "spec_decode_accepted_tokens": 8, "spec_decode_emitted_tokens": 8 + 6}
    for name, expected in other.items():
        assert value(families, name, name + "_total", method="eagle",
                     adapter="other") == expected, name
    check_group(families, "other", draft_lengths=[2] * 6, accepted_lengths=[2, 2, 1, 2, 0, 1])
    check_group(families, "a", draft_lengths=[2], accepted_lengths=[0])
    assert value(families, "spec_decode_accepted_tokens", "spec_decode_accepted_tokens_total",
                 method="ngram", adapter="other") == 1
    for encoder in ENCODERS:
        assert render(registry, encoder) == encoder(registry)


def test_without_groups_requests_count_under_default(registry) -> None:
    hooks = grouped_hooks(registry)
    verify(hooks, [1, 2], 2)
    with hooks.verify() as scope:  # the context-manager form takes groups too
        scope.set_accepted([1], 2, ["tenant-1"])
    hooks.end_step()
    families = scrape(registry)
    assert groups_of(families) == ["default", "tenant-1"]
    assert value(families, "spec_decode_accepted_tokens", "spec_decode_accepted_tokens_total",
                 method="eagle", adapter="default") == 3
    assert value(families, "spec_decode_accepted_tokens", "spec_decode_accepted_tokens_total",
                 method="eagle", adapter="tenant-1") == 1


def test_without_a_group_label_the_exposition_has_no_group_series(registry) -> None:
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False)
    verify(hooks, [1, 2], 2)
    families = scrape(registry)
    assert [s.labels for s in families["spec_metrics_label_values_folded"].samples] == [
        {"label": "method"}]
    assert all(set(s.labels) == {"method"} for s in families["spec_decode_drafts"].samples)


# ---- bad groups ------------------------------------------------------------------------

BAD_GROUPS = [
    # (groups for a batch of 3, reason, what the message names)
    (["a", None, "b"], "wrong_type", "groups[1]=None"),
    (["a", "b", 7], "wrong_type", "groups[2]=7"),
    ([b"a", "b", "c"], "wrong_type", "groups[0]=b'a'"),
    (["a", "", "b"], "wrong_type", "groups[1]=''"),
    (["a", ["b"], "c"], "wrong_type", "groups[1]=['b']"),
    (np.array([1, 2, 3]), "wrong_type", "dtype int64"),
    (np.array([b"a", b"b", b"c"]), "wrong_type", "dtype |S1"),
    ("abc", "wrong_type", "'abc'"),
    (["a", "b"], "wrong_shape", "groups has 2 entries but accepted has 3"),
    (np.array([["a"], ["b"], ["c"]]), "wrong_shape", "(3, 1)"),
]


@pytest.mark.parametrize("groups, reason, named", BAD_GROUPS)
def test_bad_groups_are_dropped_and_counted(registry, groups, reason, named, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="spec_metrics")
    hooks = grouped_hooks(registry)
    verify(hooks, [1, 1, 1], 2, groups)
    families = scrape(registry)
    assert value(families, "spec_metrics_dropped", "spec_metrics_dropped_total",
                 reason=reason) == 1
    assert "spec_decode_drafts_total" not in {s.name for s in
                                              families["spec_decode_drafts"].samples}
    assert value(families, "spec_decode_stage_duration_seconds",
                 "spec_decode_stage_duration_seconds_count", method="eagle",
                 stage="verify") == 1  # the step itself is recorded
    assert named in caplog.text and "spec_metrics.verify_end" in caplog.text


@pytest.mark.parametrize("groups, reason, named", BAD_GROUPS)
def test_bad_groups_raise_in_strict_mode(groups, reason, named) -> None:
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=None, strict=True,
                                         group_label="adapter")
    hooks.verify_start()
    with pytest.raises(StrictModeError) as info:
        hooks.verify_end([1, 1, 1], 2, groups)
    assert str(info.value).startswith("spec_metrics.verify_end: ")
    assert named in str(info.value)
    assert hooks.collector.drops.counts[reason] == 1


def test_groups_without_a_group_label_are_refused(registry, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="spec_metrics")
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=registry, tracing=False)
    verify(hooks, [1, 2], 2, ["tenant-1", "tenant-2"])
    assert sample_value(scrape(registry), "spec_metrics_dropped", "spec_metrics_dropped_total",
                        reason="groups_without_label") == 1
    assert "group_label=" in caplog.text
    strict = spec_metrics.SpecDecodeHooks("eagle", registry=None, strict=True)
    strict.verify_start()
    with pytest.raises(StrictModeError, match=r"^spec_metrics\.verify_end: groups="
                                              r"\['tenant-1'\].*pass group_label="):
        strict.verify_end([1], 2, ["tenant-1"])


def test_a_bad_group_value_is_named_in_a_long_batch(registry) -> None:
    hooks = spec_metrics.SpecDecodeHooks("eagle", registry=None, strict=True,
                                         group_label="adapter")
    groups = ["a"] * 100_000
    groups[99_998] = None
    hooks.verify_start()
    with pytest.raises(StrictModeError, match=r"groups\[99998\]=None"):
        hooks.verify_end(np.zeros(100_000, dtype=np.int64), 1, groups)


def test_object_arrays_and_numpy_strings_are_groups(registry) -> None:
    hooks = grouped_hooks(registry)
    objects = np.empty(3, dtype=object)
    objects[:] = ["x", "y", "x"]
    verify(hooks, [1, 1, 1], 1, objects)
    verify(hooks, [1, 1], 1, [np.str_("y"), "x"])
    families = scrape(registry)
    assert groups_of(families) == ["x", "y"]
    assert value(families, "spec_decode_drafts", "spec_decode_drafts_total", method="eagle",
                 adapter="x") == 3


# ---- configuration ---------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"group_label": "bad-name"}, "not a valid Prometheus label name"),
    ({"group_label": "__group"}, "not a valid Prometheus label name"),
    ({"group_label": 3}, "not a valid Prometheus label name"),
    ({"group_label": "method"}, "a label spec_metrics sets itself"),
    ({"group_label": "position"}, "a label spec_metrics sets itself"),
    ({"group_label": "engine", "labels": {"engine": "e"}}, "also a constant label"),
    ({"group_label": "group", "max_groups": 0}, "max_groups must be an integer >= 1"),
    ({"max_groups": True}, "max_groups must be an integer >= 1"),
    ({"max_groups": 2.5}, "max_groups must be an integer >= 1"),
])
def test_bad_group_configuration_raises(registry, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        spec_metrics.SpecDecodeHooks("eagle", registry=registry, **options)


def test_a_shared_collector_keeps_its_group_settings(registry) -> None:
    first = grouped_hooks(registry, max_groups=4)
    with pytest.raises(ValueError, match="group_label=None \\(collector: 'adapter'\\)"):
        spec_metrics.SpecDecodeHooks("ngram", collector=first.collector)
    with pytest.raises(ValueError, match="group_label='tenant'"):
        spec_metrics.SpecDecodeHooks("ngram", collector=first.collector, group_label="tenant")
    with pytest.raises(ValueError, match="max_groups=8 \\(collector: 4\\)"):
        spec_metrics.SpecDecodeHooks("ngram", collector=first.collector, group_label="adapter",
                                     max_groups=8)
    plain = spec_metrics.SpecDecodeHooks("eagle", registry=None)
    with pytest.raises(ValueError, match="group_label='adapter' \\(collector: None\\)"):
        spec_metrics.SpecDecodeHooks("ngram", collector=plain.collector, group_label="adapter")
    shared = spec_metrics.SpecDecodeHooks("ngram", collector=first.collector,
                                          group_label="adapter", max_draft_tokens=4)
    assert shared.collector is first.collector


def test_the_catalog_marks_the_grouped_families() -> None:
    assert [spec.name for spec in GROUPED_METRICS] == [
        "spec_decode_accepted_length", "spec_decode_draft_length", "spec_decode_drafts_total",
        "spec_decode_draft_tokens_total", "spec_decode_accepted_tokens_total",
        "spec_decode_emitted_tokens_total", "spec_decode_draft_tokens_per_position_total",
        "spec_decode_accepted_tokens_per_position_total"]


# ---- exposition and exemplars ----------------------------------------------------------

def test_grouped_exposition_equals_prometheus_client_with_exemplars(make_hooks, registry,
                                                                    clock) -> None:
    hooks = make_hooks(trace_ratio=1.0, group_label="tenant", max_groups=3,
                       labels={"model": 'm "1"'})
    odd = ['say "hi"', "back\\slash", "new\nline", "ünïcode", "x", "y"]
    rng = np.random.default_rng(3)
    steps = [(np.arange(6) % 5, 4, odd)]  # every value: three keep a row, three fold
    for step in range(12):
        batch = int(rng.integers(1, 7))
        accepted = rng.integers(0, 5, batch)
        steps.append((accepted, 4 if step % 2 else rng.integers(accepted, 5),
                      [odd[i] for i in rng.integers(0, len(odd), batch)]))
    run_steps_with_groups(hooks, clock, steps)
    hooks.declare_drafter("t", "d", 4)
    for encoder in ENCODERS:
        assert render(registry, encoder) == encoder(registry)
    families = scrape(registry)
    # Each (method, group) counter carries its own exemplar, from an exported span.
    tenants = [s.labels["tenant"] for s in families["spec_decode_drafts"].samples
               if s.exemplar is not None]
    assert len(tenants) == len(set(tenants)) == 4  # three groups and "other"


def run_steps_with_groups(hooks, clock, steps):
    for accepted, drafts, groups in steps:
        hooks.begin_step()
        hooks.verify_start()
        if clock is not None:
            clock.advance(0.01)
        hooks.verify_end(accepted, drafts, groups)
        hooks.end_step()


STEPS = [
    ([1, 2, 0], 2, ["a", "b", "a"]),
    ([3, 0], [3, 0], np.array(["b", "c"])),
    ([1], 1, None),
    ([2, 2, 2, 2], 4, ("c", "d", "e", "a")),
    ([0, 1], [1, 1], ["e", "f"]),
]


def _values(registry):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in scrape(registry).values() for s in family.samples}


def test_batched_steps_with_groups_equal_one_by_one(clock) -> None:
    registries = [CollectorRegistry(), CollectorRegistry()]
    hooks = [spec_metrics.SpecDecodeHooks("eagle", registry=r, tracing=False, max_draft_tokens=4,
                                          group_label="g", max_groups=3, batch_steps=b)
             for r, b in zip(registries, (1, 3))]
    for h in hooks:
        run_steps_with_groups(h, clock, STEPS)
    assert len(hooks[1]._pending) == 2  # 3 of 5 steps went in one batch
    hooks[1].poll()
    assert _values(registries[0]) == _values(registries[1])
    families = scrape(registries[1])
    assert sample_value(families, "spec_metrics_label_values_folded",
                        "spec_metrics_label_values_folded_total", label="g") == 1 + 2 + 2
    assert sample_value(families, "spec_decode_accepted_tokens",
                        "spec_decode_accepted_tokens_total", g="other") == 1 + 2 + 2 + 0 + 1


class LandsLater(DeviceArray):
    """Accepted counts still being copied from the device (what a CUDA tensor becomes),
    landing when the test says: the step waits in the pending queue, its groups with it."""

    __slots__ = ("_array", "landed")

    def __init__(self, array) -> None:  # no device: nothing of DeviceArray's is set up
        self.what, self.length = "accepted", len(array)
        self._array = np.array(array)
        self.landed = False

    def release_source(self) -> None:
        pass

    def ready(self) -> bool:
        return self.landed

    def wait(self) -> None:
        self.landed = True

    def discard(self) -> None:
        pass

    def result(self) -> np.ndarray:
        return _check_array(self._array, self.what)


@pytest.fixture
def device_counts(monkeypatch):
    """verify_end turns a LandsLater into the record's device counts, as it does a CUDA
    tensor; everything else goes through the real to_counts."""
    real = hooks_module.to_counts

    def to_counts(value, what, batch_size, pool=None, rings=None):
        return (value if isinstance(value, LandsLater)
                else real(value, what, batch_size, pool, rings))

    monkeypatch.setattr(hooks_module, "to_counts", to_counts)


@pytest.mark.parametrize("batch_steps", [1, 2])
def test_device_counts_keep_their_groups_until_they_land(registry, device_counts,
                                                         batch_steps) -> None:
    hooks = grouped_hooks(registry, max_groups=2, batch_steps=batch_steps)
    copies = [LandsLater(accepted) for accepted, _, _ in STEPS]
    groups = [list(g) if g is not None else None for _, _, g in STEPS]
    drafts = [d for _, d, _ in STEPS]
    run_steps_with_groups(hooks, None, list(zip(copies, drafts, groups)))
    for g in groups:  # the engine reuses its lists: the hooks kept their own values
        if g is not None:
            g[:] = ["zzz"] * len(g)
    assert len(hooks._pending) == 5
    assert "spec_decode_drafts_total" not in {
        s.name for s in scrape(registry)["spec_decode_drafts"].samples}
    copies[0].landed = copies[1].landed = True
    hooks.poll()
    assert len(hooks._pending) == 3
    families = scrape(registry)
    assert groups_of(families) == ["a", "b", "other"]  # c of the second step folded
    assert value(families, "spec_decode_accepted_tokens", "spec_decode_accepted_tokens_total",
                 method="eagle", adapter="b") == 2 + 3
    hooks.flush()  # waits for the rest
    families = scrape(registry)
    assert groups_of(families) == ["a", "b", "other"]
    # Folded: c (step 2), default (3), c, d, e (4), e, f (5).
    assert value(families, "spec_metrics_label_values_folded",
                 "spec_metrics_label_values_folded_total", label="adapter") == 1 + 1 + 3 + 2
    assert value(families, "spec_decode_accepted_tokens", "spec_decode_accepted_tokens_total",
                 method="eagle", adapter="other") == 0 + 1 + 2 + 2 + 2 + 0 + 1
    assert value(families, "spec_decode_accepted_tokens", "spec_decode_accepted_tokens_total",
                 method="eagle", adapter="a") == 1 + 0 + 2


def test_device_counts_with_bad_groups_give_their_buffer_back(registry, device_counts,
                                                             monkeypatch) -> None:
    discarded = []
    monkeypatch.setattr(LandsLater, "discard", lambda self: discarded.append(self))
    hooks = grouped_hooks(registry)
    copy = LandsLater([1, 1])
    verify(hooks, copy, 2, ["a"])  # wrong length: the copy is released, its buffer given back
    assert discarded == [copy] and not hooks._pending
    assert hooks.collector.drops.counts["wrong_shape"] == 1


def test_a_forked_child_starts_with_an_empty_group_table(registry) -> None:
    hooks = grouped_hooks(registry, max_groups=1)
    verify(hooks, [1, 1], 1, ["a", "b"])  # b folds
    hooks.collector._reset_after_fork()  # what the fork hook runs in the child
    verify(hooks, [1], 1, ["b"])  # b is first now: it gets the slot
    families = scrape(registry)
    assert groups_of(families) == ["b"]
    assert value(families, "spec_metrics_label_values_folded",
                 "spec_metrics_label_values_folded_total", label="adapter") == 0
