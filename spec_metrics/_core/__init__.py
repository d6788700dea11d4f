"""The hot path: stage hooks that fill a per-step record, and the sinks it goes to.

hooks.py (the public `SpecDecodeHooks`) and scopes.py (its `with` forms) take timestamps and
store counts in a record.py `StepRecord`; inputs.py checks and reduces the accepted counts
(numpy, or CUDA tensors copied without synchronizing); pending.py holds steps whose device
results have not landed; sinks.py hands each finished record once to the trace sink
(`spec_metrics._tracing`) and the metrics collector (`spec_metrics._prometheus`);
cuda_timing.py records CUDA events for device-side stage times. Internal: import from
`spec_metrics`.
"""
