"""The FARMS sampling grid and the convolution blocks (docs/method.md).

Pure integer geometry: which rows and columns each window covers. No tensors, no math on weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WindowGrid:
    """Windows of ``rows x cols`` cells starting at every ``row_starts`` x ``col_starts`` pair."""

    rows: int
    cols: int
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]

    @property
    def num_windows(self) -> int:
        return len(self.row_starts) * len(self.col_starts)


def validate_window_args(window: int, aspect_ratio: float, windows_per_dim: int) -> None:
    """Raise ``ValueError`` naming the argument when a FARMS setting is out of range."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"`window` must be an integer >= 2, got {window!r}")
    if isinstance(aspect_ratio, bool) or not isinstance(aspect_ratio, (int, float)):
        raise ValueError(f"`aspect_ratio` must be a positive finite number, got {aspect_ratio!r}")
    if not (math.isfinite(aspect_ratio) and aspect_ratio > 0):
        raise ValueError(f"`aspect_ratio` must be a positive finite number, got {aspect_ratio!r}")
    if isinstance(windows_per_dim, bool) or not isinstance(windows_per_dim, int) or windows_per_dim < 1:
        raise ValueError(f"`windows_per_dim` must be an integer >= 1, got {windows_per_dim!r}")


def grid_starts(size: int, win: int, k: int) -> tuple[int, ...]:
    """Start offsets of up to ``k`` evenly spread, overlapping windows of length ``win`` in ``size``.

    Exactly the reference's ``fixed_sampling``: the step is ``(size - win) // (k - 1)`` (at least 1),
    starts are clamped to the last valid offset, so they are distinct and increasing.
    """
    step = max(1, (size - win) // (k - 1)) if k > 1 else 1
    count = min(k, max(1, (size - win) // step + 1))
    return tuple(min(i * step, size - win) for i in range(count))


def farms_grid(rows: int, cols: int, window: int, aspect_ratio: float, windows_per_dim: int) -> WindowGrid | None:
    """The window grid of a ``rows x cols`` matrix, or ``None`` when it cannot hold a 2x2 window.

    The window is ``m x int(m * Q)``; ``m`` is clamped to ``min(m, rows, floor(cols / Q))`` so that
    the window fits for any ``Q`` (the reference clamps to ``min(m, rows, cols)``, wrong for Q > 1).
    """
    m = min(window, rows, math.floor(cols / aspect_ratio))
    n = int(m * aspect_ratio)
    if min(m, n) < 2:
        return None
    return WindowGrid(
        rows=m,
        cols=n,
        row_starts=grid_starts(rows, m, windows_per_dim),
        col_starts=grid_starts(cols, n, windows_per_dim),
    )


def conv_block_shape(rows: int, cols: int, aspect_ratio: float) -> tuple[int, int, int]:
    """``(block_rows, block_cols, num_blocks)`` of the paper's conv sampling.

    ``rows >= cols`` (kernel-position matrices are transposed to be tall). The expressions are the
    reference's own: ``int(cols // (1 / Q))`` and ``int(cols // Q)`` differ from ``int(cols * Q)``.
    """
    if aspect_ratio <= 1:
        block_rows, block_cols = cols, int(cols // (1 / aspect_ratio))
    else:
        block_rows, block_cols = int(cols // aspect_ratio), cols
    return max(1, block_rows), max(1, block_cols), rows // cols
