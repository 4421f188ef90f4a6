"""Planning a layer's analysis: its FARMS windows, or why it is skipped.

The step between discovering layers and solving eigenvalues: the weight checks (lazy, shared,
meta, non-float, non-finite, all-zero, too small), the window grid of a matrix (FARMS or the full
ESD), and the paper's conv sampling, per group for grouped convolutions (docs/method.md).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from farms_lightning.engine.report import LayerStats
from farms_lightning.engine.spectra import WindowSet, full_grid
from farms_lightning.engine.windows import WindowGrid, conv_block_shape, farms_grid
from farms_lightning.models.layers import LayerMatrix

#: The paper's ``conv_norm``: conv blocks are scaled by √0.5, so their eigenvalues by 0.5.
CONV_EIGENVALUE_SCALE = 0.5


#: Status of a layer whose windows are too small to judge (see :data:`MIN_WINDOW_SIDE`).
TOO_SMALL = "too_small"
#: Default ``min_window_side``: windows with fewer rows or columns (eigenvalues per window) give no alpha: their random-matrix
#: baseline spreads too widely for any alpha to be told apart from chance. Measured with the ``median``
#: fit (cv preset, 5 random draws): the draws' range is 1.53, 0.79, 0.22 and 0.24 on 2-, 3-, 8- and
#: 10-row heads of 768 columns, 0.11 on 16 rows, 0.01 on ordinary 384x384 and 768x3072 layers.
MIN_WINDOW_SIDE = 16


def skipped(layer: LayerMatrix, reason: str) -> LayerStats:
    """The ``skipped`` statistics of ``layer``, with the reason."""
    return LayerStats(layer.name, layer.module_type, layer.shape, "skipped", reason, num_params=layer.num_params)


def plan_layer(
    layer: LayerMatrix, settings: dict[str, Any], owners: dict[tuple, str], wanted: bool = True
) -> LayerStats | WindowSet | None:
    """The windows of one layer, its ``skipped`` statistics with the reason, or ``None`` if unwanted."""
    try:
        if layer.is_lazy:
            return skipped(layer, "uninitialised (lazy) weights") if wanted else None
        owner = owners.setdefault(layer.identity(), layer.name)
        if not wanted:
            return None
        if owner != layer.name:
            return skipped(layer, f"shares weights with {owner}")
        if layer.skip_reason:
            return skipped(layer, layer.skip_reason)
        if layer.is_conv:
            degenerate = degenerate_conv_reason(layer.weight.shape, layer.groups)
            if degenerate:
                return skipped(layer, degenerate)
        if layer.weight.is_meta:
            return skipped(layer, "weights on the meta device (not materialised)")
        w = layer.oriented()
        if w.is_meta:
            return skipped(layer, "weights on the meta device (not materialised)")
        if not w.is_floating_point():
            return skipped(layer, f"non-float weights ({w.dtype})")
        if w.dtype.itemsize == 1:  # float8: upcast exactly (few ops exist for it)
            w = w.float()
        if w.numel() == 0:
            return skipped(layer, "empty weights")
        low, high = (float(v) for v in torch.aminmax(w))  # one pass: NaN and inf propagate
        if not (math.isfinite(low) and math.isfinite(high)):
            return skipped(layer, "non-finite weights")
        if low == high == 0:
            return skipped(layer, "all-zero weights")
        windows = conv_windows(w, layer.groups, settings) if layer.is_conv else matrix_windows(w, settings)
    except Exception as error:  # noqa: BLE001 - a layer never crashes the analysis
        return LayerStats(layer.name, layer.module_type, (), "failed", f"analysis error: {error!r}")
    if isinstance(windows, str):
        return skipped(layer, windows)
    per_group = windows.eigenvalues_per_group
    if per_group < settings["min_eigenvalues"]:
        where = f" (blocks of {layer.groups} groups)" if layer.groups > 1 else ""
        return skipped(layer, f"too small: {per_group} eigenvalues per ESD{where} < min_eigenvalues="
                               f"{settings['min_eigenvalues']}")
    side, smallest = min(windows.grid.rows, windows.grid.cols), settings.get("min_window_side", MIN_WINDOW_SIDE)
    if side < smallest:
        return LayerStats(layer.name, layer.module_type, layer.shape, TOO_SMALL,
                          f"{windows.grid.rows}x{windows.grid.cols} windows, fewer than {smallest} "
                          "eigenvalues each: too few to tell from a random matrix",
                          num_params=layer.num_params)
    return windows


def matrix_windows(w: torch.Tensor, settings: dict[str, Any]) -> WindowSet | str:
    """The FARMS windows of a 2-D weight (or the whole matrix for ``esd="full"``), or why it has none."""
    rows, cols = w.shape
    if settings["esd"] == "full":
        return WindowSet(w.unsqueeze(0), full_grid(rows, cols))
    grid = farms_grid(rows, cols, settings["window"], settings["aspect_ratio"], settings["windows_per_dim"])
    if grid is None:
        return (f"too small for a FARMS window: {rows}x{cols} cannot hold a window of at least 2x2 "
                f"with aspect ratio {settings['aspect_ratio']}")
    return WindowSet(w.unsqueeze(0), grid)


def degenerate_conv_reason(shape: Sequence[int], groups: int) -> str:
    """Why a conv has no matrix to analyse (a group's kernel-position matrices have a dimension below 2), or ``""``."""
    if len(shape) < 3 or groups < 1 or shape[0] % groups:
        return ""
    rows, cols = shape[0] // groups, shape[1]
    if min(rows, cols) >= 2:
        return ""
    if groups > 1:
        return (f"depthwise convolution ({groups} groups of {rows}x{cols} kernel-position matrices): "
                "no matrix to analyse")
    return f"degenerate convolution ({rows}x{cols} kernel-position matrices): no matrix to analyse"


def conv_group_matrices(w: torch.Tensor, groups: int) -> tuple[torch.Tensor, int, int]:
    """Every group's kernel-position matrices, tall, stacked along the rows: ``(positions, groups·R, C)``.

    Group ``j`` holds rows ``[j·R, (j+1)·R)``. Without groups this is the stored ``(out, in)`` slice
    per kernel position, transposed when ``out < in``.
    """
    out, inp = w.shape[:2]
    rows = out // groups
    kernel = w.flatten(2)  # (out, in/groups, positions)
    if rows >= inp:
        return kernel.permute(2, 0, 1), rows, inp
    # Each group's (rows, in) matrix transposed to (in, rows), groups stacked vertically.
    return kernel.reshape(groups, rows, inp, -1).permute(3, 0, 2, 1).reshape(kernel.shape[2], groups * inp, rows), \
        inp, rows


def conv_windows(w: torch.Tensor, groups: int, settings: dict[str, Any]) -> WindowSet:
    """The paper's conv sampling (docs/method.md), per group: tall kernel-position matrices cut into row blocks.

    A grouped conv is ``groups`` independent convs: the blocks of every group are fitted, and the
    full ESD pools all groups (the exact ESD of the block-diagonal matrix).
    """
    matrices, rows, cols = conv_group_matrices(w, groups)
    if settings["esd"] == "full":
        grid = WindowGrid(rows, cols, tuple(g * rows for g in range(groups)), (0,))
        return WindowSet(matrices, grid, scale=CONV_EIGENVALUE_SCALE)
    block_rows, block_cols, blocks = conv_block_shape(rows, cols, settings["aspect_ratio"])
    starts = tuple(g * rows + b * block_rows for g in range(groups) for b in range(blocks))
    grid = WindowGrid(block_rows, block_cols, starts, (0,))
    return WindowSet(matrices, grid, scale=CONV_EIGENVALUE_SCALE, group_by_row_start=True)
