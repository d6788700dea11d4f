"""Plot per-step cost against batch size from `bench_hooks.py --sweep` JSON (log-log).

    python benchmarks/plot_hooks.py [benchmarks/results/hooks_sweep.json] [--k 4]
        [--out benchmarks/results/hooks_sweep.png]

One line per mode, the floor and each baseline, at one K (median; the dotted line of the same
colour is its p99); the legend gives each line's least-squares slope in µs per request.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "disabled": ("disabled hooks", "tab:gray", "o", "-"),
    "metrics": ("metrics", "tab:blue", "o", "-"),
    "metrics+tracing": ("metrics + tracing (0.01, default)", "tab:green", "o", "-"),
    "metrics+tracing@1.0": ("metrics + tracing @1.0", "tab:olive", "o", "-"),
    "floor": ("floor: 7 timestamps + 1 np.bincount", "black", "x", ":"),
    "prometheus_loop": ("baseline: prometheus observe per request", "tab:orange", "s", "--"),
    "otel_histograms": ("baseline: OTel SDK histogram per request", "tab:purple", "s", "--"),
    "otel_spans": ("baseline: OTel SDK span per request per stage", "tab:red", "s", "--"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="?", default="benchmarks/results/hooks_sweep.json")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/hooks_sweep.png")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        result = json.load(f)
    cells = sorted((c for c in result["cells"] if c["k"] == args.k), key=lambda c: c["batch"])
    if not cells:
        parser.error(f"no cells with K={args.k} in {args.json}")
    batches = [c["batch"] for c in cells]

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for name in result["series"]:
        label, color, marker, line = STYLE.get(name, (name, None, "o", "-"))
        med = [c["results"][name]["median_us"] for c in cells]
        slope = result["slopes"][name][str(args.k)]["us_per_request"]
        ax.plot(batches, med, marker=marker, linestyle=line, color=color,
                label=f"{label}  [slope {slope:+.3g} µs/request]")
        if name not in ("floor",):
            p99 = [c["results"][name]["p99_us"] for c in cells]
            ax.plot(batches, p99, linestyle=":", color=color, alpha=0.45, linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlim(batches[0] * 0.8, batches[-1] * 1.25)
    ax.set_xlabel("batch size (requests per decode step)")
    ax.set_ylabel("CPU cost per decode step, µs (median; dotted: p99)")
    date = result.get("date", "")[:10]
    cores = result.get("machine", {}).get("cores")
    ax.set_title(f"Instrumentation cost per step vs batch size, K={args.k} "
                 f"({cores}-core CPU, {date})", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
