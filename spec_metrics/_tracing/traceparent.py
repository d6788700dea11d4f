"""W3C trace context (`traceparent`) handling for the requests of a batch.

`any_sampled` runs every step a batch carries trace contexts, so it works on the joined
string with C-level slicing instead of looping over requests in Python. Full parsing, a
loop, happens only for steps whose spans are built.
"""

from __future__ import annotations

import re
from typing import Sequence

from opentelemetry.trace import SpanContext, TraceFlags

__all__ = ["parse_traceparent", "any_sampled"]

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_WIDTH = 55  # "00-" + 32 + "-" + 16 + "-" + 2
_SAMPLED_LAST_DIGITS = frozenset("13579bdf")  # flags whose low bit (sampled) is set


def parse_traceparent(value: object) -> SpanContext | None:
    """The remote span context of a `traceparent` header value, or None if it is malformed."""
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if trace_id == 0 or span_id == 0:
        return None
    flags = TraceFlags(int(flags_hex, 16))
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)


def any_sampled(traceparents: Sequence[str | None]) -> bool:
    """Whether any request's context has the sampled flag. None entries are skipped."""
    try:
        joined = "".join(filter(None, traceparents))
    except TypeError:  # a non-string entry: take the slow path, it skips what it can't read
        return _any_sampled_slow(traceparents)
    count, remainder = divmod(len(joined), _WIDTH)
    if remainder or joined[2::_WIDTH].count("-") != count or joined[52::_WIDTH].count("-") != count:
        return _any_sampled_slow(traceparents)
    flags_low_digits = joined[54::_WIDTH]
    return any(digit in flags_low_digits for digit in _SAMPLED_LAST_DIGITS)


def _any_sampled_slow(traceparents: Sequence[object]) -> bool:
    for value in traceparents:
        context = parse_traceparent(value)
        if context is not None and context.trace_flags.sampled:
            return True
    return False
