"""GPU: what `warm_up_device` buys. Run on a CUDA machine:

    python benchmarks/cold_pinned.py

While the device is busy (a ~0.5 s sleep kernel), one step hands a CUDA tensor to
`verify_end`. Without warm-up the first pinned-memory allocation waits for the device; with
warm-up the hook returns at once and the step waits in the pending queue instead.
"""

from __future__ import annotations

import time

import torch
from prometheus_client import CollectorRegistry

import spec_metrics


def main() -> None:
    accepted = torch.ones(3, dtype=torch.int64, device="cuda")  # allocated before timing
    for warm in (False, True):
        hooks = spec_metrics.SpecDecodeHooks("bench", registry=CollectorRegistry(),
                                             tracing=False, max_draft_tokens=4)
        if warm:
            hooks.warm_up_device(8)
        torch.cuda.synchronize()
        torch.cuda._sleep(1_000_000_000)  # about 0.5 s of device time on an H100
        start = time.perf_counter()
        hooks.verify_start()
        hooks.verify_end(accepted, 4)
        hooks.end_step()
        took = time.perf_counter() - start
        print(f"warm_up_device={warm}: first step's hooks took {took * 1e3:.2f} ms "
              f"with the device busy; steps pending: {len(hooks._pending)}")
        hooks.flush()


if __name__ == "__main__":
    main()
