"""End to end, issue 15: the relative-drop and payoff alerts on a real Prometheus.

Three runs of `spec-metrics demo`, each scraped by its own Prometheus loaded with the
generated rules (windows shortened), each with one scheduled event:

* `--drafter-swap-at`: a weaker drafter (acceptance ~40% lower, still far above 25%):
  SpecDecodeAcceptanceDropped fires, per request group; SpecDecodeAcceptanceRateLow never
  becomes active.
* `--draft-slowdown-at`: the draft stage 6x slower: SpecDecodeNotPayingOff fires; before it,
  the recorded speedup is measured (plain steps), above 1.
* `--mix-shift-at` alone: the share of low-acceptance requests rises, so the server-wide
  acceptance falls, but every group keeps its own: none of the acceptance and payoff alerts
  becomes active.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from spec_metrics.ops.rules import RuleParams, build_rules, write_rules

pytestmark = pytest.mark.e2e

EVENT_AT_S = 35.0  # after the 20 s baseline window (offset 5 s) holds healthy data
AFTER_S = 25.0  # how long each run goes on after its event
SCRAPE_S = EVAL_S = 1.0
PARAMS = RuleParams(rate_window="5s", scrape_interval="1s", evaluation_interval="1s",
                    acceptance_for="3s", mean_length_for="3s", decay_for="3s",
                    verify_for="3s", overhead_for="3s", absent_for="3s",
                    drop_baseline_window="20s", drop_for="3s", payoff_for="3s")
RATE_WINDOW_S, FOR_S, POLL_S = 5.0, 3.0, 0.5
# From the event to firing, at most: a scrape, a rate window of new data, the recording and
# alerting groups (2 evaluations), `for` plus an evaluation, a poll; then scheduling slack on
# a loaded 2-core machine.
FIRING_BOUND_S = SCRAPE_S + RATE_WINDOW_S + 2 * EVAL_S + FOR_S + EVAL_S + POLL_S
FIRING_SLACK_S = 4.0
DROPPED, LOW, NOT_PAYING = ("SpecDecodeAcceptanceDropped", "SpecDecodeAcceptanceRateLow",
                            "SpecDecodeNotPayingOff")
GROUPS = {"prose", "hex"}


def _record(fragment: str) -> str:
    (name,) = [r["record"] for g in build_rules(PARAMS)["groups"] for r in g["rules"]
               if "record" in r and fragment in r["record"]]
    return name


def _values(prom: Any, expr: str) -> dict[str, float]:
    """group (or "") -> value of an instant query, finite values only."""
    out = {}
    for sample in prom.query(expr)["result"]:
        value = float(sample["value"][1])
        if math.isfinite(value):
            out[sample["metric"].get("group", "")] = value
    return out


def _run(prometheus: Any, demo: Any, tmp_path: Any, event_flag: str, event_line: str,
         watch: tuple[str, ...]) -> dict[str, Any]:
    """Run the demo with `event_flag` at EVENT_AT_S; poll until AFTER_S after the event line.
    Returns alert states seen (alert -> [(seconds from the event, state, labels)]) and the
    recorded series sampled before and after the event."""
    rule_files = write_rules(tmp_path / "rules", PARAMS)
    run = demo("--duration", str(EVENT_AT_S + AFTER_S), event_flag, str(EVENT_AT_S),
               "--sample-ratio", "0")
    prom = prometheus([run.target], rule_files, scrape_interval=f"{SCRAPE_S:g}s",
                      evaluation_interval=f"{EVAL_S:g}s")
    seen: dict[str, list[tuple[float | None, str, dict[str, str]]]] = {a: [] for a in watch}
    samples: dict[str, list[tuple[float | None, dict[str, float]]]] = {
        "group_acceptance": [], "acceptance": [], "speedup": [], "speedup_measured": []}
    group_rule = "_group_model_engine:spec_decode_acceptance:ratio_rate5s"
    queries = {"group_acceptance": _record(group_rule),
               "acceptance": _record("method_model_engine:spec_decode_acceptance:"),
               "speedup": _record(":spec_decode_speedup:"),
               "speedup_measured": _record(":spec_decode_speedup_measured:")}
    deadline = time.monotonic() + EVENT_AT_S + AFTER_S + 60  # model loading on a busy box
    # Observations are stamped when their answer arrived and placed relative to the event
    # line at the end: a poll on a busy machine can take seconds.
    raw_seen: list[tuple[float, str, str, dict[str, str]]] = []
    raw_samples: list[tuple[float, str, dict[str, float]]] = []
    while True:
        event = run.stderr.first(event_line)
        now = time.monotonic()
        if event is not None and now - event > AFTER_S - 3:
            break
        assert now < deadline and run.process.poll() is None, (
            f"demo ended early or no {event_line!r} in time\n{run.diagnostics()}")
        alerts = prom.alerts()
        raw_seen += [(time.monotonic(), a["labels"]["alertname"], a["state"], a["labels"])
                     for a in alerts if a["labels"]["alertname"] in seen]
        for key, expr in queries.items():
            values = _values(prom, expr)
            if values:
                raw_samples.append((time.monotonic(), key, values))
        time.sleep(POLL_S)
    for at, name, state, labels in raw_seen:
        seen[name].append((at - event if at >= event else None, state, labels))
    for at, key, values in raw_samples:
        samples[key].append((at - event if at >= event else None, values))
    return {"seen": seen, "samples": samples, "run": run, "prom": prom}


def _diag(result: dict[str, Any]) -> str:
    return (f"{result['run'].diagnostics()}\n--- alerts ---\n{result['prom'].alerts()}\n"
            f"--- samples ---\n" + "\n".join(f"{k}: {v[-8:]}" for k, v in
                                              result["samples"].items()))


def _before(samples: list, settle: float = 0.0) -> list[dict[str, float]]:
    return [v for since, v in samples if since is None]


def _after(samples: list, settle: float) -> list[dict[str, float]]:
    return [v for since, v in samples if since is not None and since >= settle]


def test_drafter_swap_fires_acceptance_dropped_not_rate_low(prometheus, demo, tmp_path,
                                                            demo_model_cached):
    r = _run(prometheus, demo, tmp_path, "--drafter-swap-at", "drafter swapped",
             (DROPPED, LOW))
    seen = r["seen"]
    assert not [s for s in seen[DROPPED] if s[0] is None], (
        f"{DROPPED} active before the swap: {seen[DROPPED]}\n" + _diag(r))
    assert not seen[LOW], f"{LOW} became active: {seen[LOW]}\n" + _diag(r)
    firing = [s for s in seen[DROPPED] if s[1] == "firing"]
    assert firing, f"{DROPPED} never fired: {seen[DROPPED]}\n" + _diag(r)
    first = min(since for since, _, _ in firing)
    assert first <= FIRING_BOUND_S + FIRING_SLACK_S, (first, seen[DROPPED])
    assert first >= FOR_S - 0.5, (first, seen[DROPPED])
    # Per group: every workload class lost acceptance, so both fire, each with its label.
    assert {labels["group"] for _, _, labels in firing} == GROUPS, firing
    # The server-wide rate stayed far above SpecDecodeAcceptanceRateLow's threshold.
    after = [min(v.values()) for v in _after(r["samples"]["acceptance"], RATE_WINDOW_S + 1)]
    assert after and min(after) > PARAMS.acceptance_rate_min + 0.05, after  # ~0.36
    before = [min(v.values()) for v in _before(r["samples"]["acceptance"])]
    assert max(after) <= 0.7 * min(before[-5:]), (before[-5:], after)


def test_draft_slowdown_fires_not_paying_off(prometheus, demo, tmp_path, demo_model_cached):
    r = _run(prometheus, demo, tmp_path, "--draft-slowdown-at", "slower", (NOT_PAYING,))
    seen = r["seen"][NOT_PAYING]
    assert not [s for s in seen if s[0] is None], f"active before the slowdown: {seen}"
    # Before: speculation pays, by the measured baseline (the demo's plain steps).
    measured = [v[""] for v in _before(r["samples"]["speedup_measured"])]
    assert len(measured) >= 10 and min(measured[-10:]) > 1.0, measured + [_diag(r)]
    firing = [s for s in seen if s[1] == "firing"]
    assert firing, f"{NOT_PAYING} never fired: {seen}\n" + _diag(r)
    first = min(since for since, _, _ in firing)
    assert FOR_S - 0.5 <= first <= FIRING_BOUND_S + FIRING_SLACK_S, (first, seen)
    after = [v[""] for v in _after(r["samples"]["speedup"], RATE_WINDOW_S + 1)]
    assert after and max(after) < 1.0, after


def test_mix_shift_alone_fires_nothing(prometheus, demo, tmp_path, demo_model_cached):
    r = _run(prometheus, demo, tmp_path, "--mix-shift-at", "mix shifted",
             (DROPPED, LOW, NOT_PAYING))
    active = {name: states for name, states in r["seen"].items() if states}
    assert not active, f"alerts active around a workload shift: {active}\n" + _diag(r)
    # The shift is real: the server-wide acceptance fell, while each group kept its own.
    before = _before(r["samples"]["acceptance"])[-5:]
    after = _after(r["samples"]["acceptance"], RATE_WINDOW_S + 1)
    assert before and after
    mean_before = sum(v[""] for v in before) / len(before)
    mean_after = sum(v[""] for v in after) / len(after)
    assert mean_after < mean_before - 0.05, (before, after)  # ~0.67 -> ~0.59
    groups_before = _before(r["samples"]["group_acceptance"])[-5:]
    groups_after = _after(r["samples"]["group_acceptance"], RATE_WINDOW_S + 1)
    for group in GROUPS:
        low = min(v[group] for v in groups_after if group in v)
        high = max(v[group] for v in groups_before if group in v)
        assert low > PARAMS.drop_ratio_max * high, (group, groups_before, groups_after)
