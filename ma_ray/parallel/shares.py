"""Balanced contiguous partition of ``n`` items (heads or experts) over ordered bins (GPUs).

One rule, used for heads over the attention pool and for experts over the MoE pool: counts
differ by at most one, every bin gets a contiguous range, and the larger shares come first
(32 heads over 12 GPUs: 3,3,3,3,3,3,3,3,2,2,2,2, the methodology's layout). Contiguous ranges keep a
GPU's heads (experts) one slice of the packed Q/K/V rows (stacked expert weights), so moving
them is a handful of narrow copies rather than a gather.
"""

from __future__ import annotations

from typing import List


def share_counts(num_items: int, num_bins: int) -> List[int]:
    """How many items each bin gets: ``num_items // num_bins``, plus one for the first bins."""
    if num_bins < 1:
        raise ValueError(f"need at least one bin, got {num_bins}")
    if num_items < 0:
        raise ValueError(f"item count must not be negative, got {num_items}")
    base, extra = divmod(num_items, num_bins)
    return [base + 1 if i < extra else base for i in range(num_bins)]


def balanced_ranges(num_items: int, num_bins: int) -> List[range]:
    """Contiguous ranges of ``0..num_items-1``, one per bin, sized by ``share_counts``."""
    ranges, start = [], 0
    for count in share_counts(num_items, num_bins):
        ranges.append(range(start, start + count))
        start += count
    return ranges
