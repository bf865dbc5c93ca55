"""The words a windowed query and its SQL share: the aggregate functions and what a bucket holds.

They sit below both of their users, so the layers point one way:

    gateway/aggregation.py (rules: limits, windows, fill) --> gateway/store/aggregate.py (SQL)
              |                                                        |
              +------------------> gateway/buckets.py <----------------+
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum


class Agg(StrEnum):
    AVG = "avg"
    MIN = "min"
    MAX = "max"
    SUM = "sum"
    COUNT = "count"
    FIRST = "first"
    LAST = "last"
    STDDEV = "stddev"


# One non-empty bucket: (start in epoch microseconds, number of readings, the value of each agg
# of `value_aggs(aggs)`, in that order). Plain tuples: an answer can hold 10,000 x 1,000 of them.
Bucket = tuple[int, int, tuple[float | None, ...]]


def value_aggs(aggs: Sequence[Agg]) -> list[Agg]:
    """The aggs that carry a value, in the order asked (`count` is a bucket's own field)."""
    return [a for a in aggs if a is not Agg.COUNT]
