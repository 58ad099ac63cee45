"""Small statistics helpers for benchmark results."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in 0..1); 0.0 when empty."""
    if not sorted_values:
        return 0.0
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside 0..1")
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[rank - 1])
