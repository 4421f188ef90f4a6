"""Gram matrices of overlapping windows, built from shared pieces: each piece is multiplied once.

FARMS windows overlap when ``k`` windows of side ``m`` cover a shorter side (the ``llm`` preset: 10
windows of 2000 on a side of 4096, or of 768 on GPT-2's 3072). A window's Gram matrix ``X Xᵀ`` (its
columns are the inner dimension; for a tall window ``Xᵀ X`` over its rows) is the sum, over the
pieces of the inner dimension it covers, of the pieces' Gram matrices. The pieces lie between all
window edges of a *band* (the windows that share their outer start), so each is multiplied once per
band instead of once per window covering it; every window adds its pieces up in inner order (the
same bits whatever else is solved). This is a blocked float64 summation of the same products, as
accurate as the direct one (its error is within the same ``k·eps·λmax`` bound).
"""

from __future__ import annotations

import torch

#: Windows are built from shared pieces when a band's windows cover their span this many times over.
MIN_OVERLAP = 1.5


def _geometry(grid) -> tuple[bool, int, int]:  # type: ignore[no-untyped-def]
    """``(wide, outer side, inner side)``: wide windows (rows <= cols) have their columns inner."""
    wide = grid.rows <= grid.cols
    return wide, (grid.rows if wide else grid.cols), (grid.cols if wide else grid.rows)


def overlap(grid) -> float:  # type: ignore[no-untyped-def]
    """How many times over the windows of one band cover the inner span (1 = no overlap)."""
    wide, _, inner = _geometry(grid)
    starts = sorted(set(grid.col_starts if wide else grid.row_starts))
    covered, end = 0, -1
    for start in starts:
        covered += start + inner - max(start, end)
        end = start + inner
    return len(starts) * inner / covered


def band_key(grid, row: torch.Tensor) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """The band of a window (an index row ``(matrix, row start, col start)``): matrix and outer start."""
    wide, _, _ = _geometry(grid)
    return int(row[0]), int(row[1] if wide else row[2])


def band_grams(matrices: torch.Tensor, grid, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Float64 Gram matrices and structural-zero counts of the windows ``index`` (rows of one band).

    Returns ``(grams (B, n, n), zeros (B,))`` with ``n = min(rows, cols)``, as
    :func:`~farms_lightning.engine.window_solvers.gram_eigenvalues` and ``structural_zeros`` would
    see the windows.
    """
    wide, outer, inner = _geometry(grid)
    p, outer_index = band_key(grid, index[0])
    matrix = matrices[p] if wide else matrices[p].T
    outer_start = (grid.row_starts if wide else grid.col_starts)[outer_index]
    band = matrix[outer_start:outer_start + outer]
    starts = [(grid.col_starts if wide else grid.row_starts)[int(i)] for i in index[:, 2 if wide else 1]]
    edges = sorted({s for s in starts} | {s + inner for s in starts})
    grams = torch.empty(len(starts), outer, outer, dtype=torch.float64, device=matrices.device)
    started = [False] * len(starts)
    nonzero_rows = torch.zeros(len(starts), outer, dtype=torch.bool, device=matrices.device)
    for lo, hi in zip(edges[:-1], edges[1:]):
        covering = [j for j, s in enumerate(starts) if s <= lo and hi <= s + inner]
        if not covering:
            continue
        piece = band[:, lo:hi].to(torch.float64)
        gram = piece @ piece.T
        rows = piece.abs().amax(dim=1) != 0
        for j in covering:
            if started[j]:
                grams[j] += gram
            else:
                grams[j].copy_(gram)
                started[j] = True
            nonzero_rows[j] |= rows
    # Non-zero inner lines (columns of a wide window) per window, from one pass over the span.
    first, last = min(starts), max(starts) + inner
    lines = (band[:, first:last].abs().amax(dim=0) != 0).to(torch.long)
    counts = torch.cat([torch.zeros(1, dtype=torch.long, device=lines.device), torch.cumsum(lines, 0)])
    nonzero_lines = torch.stack([counts[s - first + inner] - counts[s - first] for s in starts])
    rank_bound = torch.minimum(nonzero_rows.sum(dim=1), nonzero_lines)
    return grams, min(outer, inner) - rank_bound
