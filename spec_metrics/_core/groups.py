"""Request groups passed to `verify_end(..., groups=...)`: checked, factorized, reduced.

An engine labels each request of the batch with a group value (a LoRA adapter, a tenant, a
workload class). The hook turns the values into the distinct values of the batch (first seen
first) and, per request, the index of its value: C-speed dict and map calls, no Python loop
over requests. `group_histograms` reduces the accepted and draft counts to one histogram row
per distinct value with one `np.bincount` each. Which values keep their own series is the
collector's business (_prometheus/groups.py), decided per distinct value.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from spec_metrics._support.drops import InputRejected

__all__ = ["RequestGroups", "to_groups", "group_histograms", "MAX_GROUP_VALUE_LENGTH"]

# Longest group value accepted: label values are stored and sent on every scrape.
MAX_GROUP_VALUE_LENGTH = 128


class RequestGroups(NamedTuple):
    values: list[str]  # the distinct group values of the batch, first seen first
    inverse: np.ndarray  # per request, the index of its value in `values` (intp)


def to_groups(value: Any, length: int) -> RequestGroups:
    """The checked groups of a batch of `length` requests, or InputRejected (wrong_type,
    wrong_shape) naming the first offending entry."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise InputRejected("wrong_shape", f"groups must be 1-D (one group value per "
                                                 f"request), got shape {value.shape}")
        if value.dtype.kind not in "UO":
            raise InputRejected("wrong_type", f"groups has dtype {value.dtype}; pass one str "
                                               "per request (a list, or a numpy array of str "
                                               "or object)")
        items: Any = value.tolist()
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise InputRejected("wrong_type", f"groups must be a list, tuple or numpy array with "
                                           f"one group value (str) per request, got "
                                           f"{_short(value)}")
    if len(items) != length:
        raise InputRejected("wrong_shape", f"groups has {len(items)} entries but accepted "
                                             f"has {length}")
    try:
        values = list(dict.fromkeys(items))  # the distinct values, first seen first (C speed)
    except TypeError:  # an unhashable entry (a list, a dict): find the first bad one
        index = next(i for i, item in enumerate(items) if not _valid(item))
        raise _bad(index, items[index]) from None
    for group in values:  # the distinct values only
        if not _valid(group):
            # The first entry of the first bad value is the first bad entry.
            raise _bad(items.index(group), group)
    # numpy.str_ (or another str subclass) becomes str; it hashes and compares like its str,
    # so the requests' entries still find their index below.
    values = [group if type(group) is str else str(group) for group in values]
    position = {group: i for i, group in enumerate(values)}
    inverse = np.fromiter(map(position.__getitem__, items), dtype=np.intp, count=length)
    return RequestGroups(values, inverse)


def group_histograms(accepted: np.ndarray, draft_tokens: "int | np.ndarray",
                     groups: RequestGroups, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct group value, the accepted-length and draft-length histograms (shape:
    values x size), from checked counts; one bincount each. Accepted length counts only the
    requests that had drafts, as `summarize` does."""
    inverse = groups.inverse
    n = inverse.shape[0]
    if accepted.shape[0] != n:
        raise InputRejected("wrong_shape", f"groups has {n} entries but accepted has "
                                             f"{accepted.shape[0]}")
    cells = len(groups.values) * size
    row = inverse * size
    if isinstance(draft_tokens, np.ndarray):
        draft = np.bincount(row + draft_tokens, minlength=cells)
        with_drafts = draft_tokens > 0
        if not with_drafts.all():
            row, accepted = row[with_drafts], accepted[with_drafts]
        hist = np.bincount(row + accepted, minlength=cells)
    else:
        draft = np.zeros(cells, dtype=np.int64)
        draft[draft_tokens::size] = np.bincount(inverse, minlength=len(groups.values))
        hist = (np.bincount(row + accepted, minlength=cells) if draft_tokens
                else np.zeros(cells, dtype=np.int64))
    return hist.reshape(-1, size), draft.reshape(-1, size)


def _valid(group: Any) -> bool:
    return isinstance(group, str) and 0 < len(group) <= MAX_GROUP_VALUE_LENGTH


def _bad(index: int, group: Any) -> InputRejected:
    why = ("is not a string" if not isinstance(group, str) else "is empty" if not group
           else f"is longer than {MAX_GROUP_VALUE_LENGTH} characters")
    return InputRejected("wrong_type", f"groups[{index}]={_short(group)} {why}; pass one "
                                       "non-empty str per request")


def _short(value: Any, limit: int = 80) -> str:
    text = f"{value!r} ({type(value).__name__})"
    return text if len(text) <= limit else text[: limit - 3] + "..."
