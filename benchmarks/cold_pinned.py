import time, torch, spec_metrics
from prometheus_client import CollectorRegistry
for warm in (False, True):
    h = spec_metrics.SpecDecodeHooks("e", registry=CollectorRegistry(), tracing=False, max_draft_tokens=4)
    if warm: h.warm_up_device(8)
    torch.cuda.synchronize(); torch.cuda._sleep(1_000_000_000)
    t=time.perf_counter(); h.verify_start(); h.verify_end(torch.ones(3, dtype=torch.int64, device="cuda"), 4); h.end_step(); dt=time.perf_counter()-t
    print(f"warm_up={warm}: first verify_end with the device busy ~0.5 s took {dt*1e3:.2f} ms; pending={len(h._pending)}")
    h.flush()
