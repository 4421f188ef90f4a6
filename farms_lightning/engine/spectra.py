"""Eigenvalues of weight windows, batched: FARMS pooled ESDs and plain full ESDs.

Every window ``X`` gives the ``min(rows, cols)`` eigenvalues of its smaller Gram matrix
(``X Xᵀ`` or ``Xᵀ X``), i.e. its squared singular values, computed in float64 from the weights as
stored (bf16/fp16/fp32 upcast exactly). A Gram matrix resolves eigenvalues only to a small multiple
of ``eps·λmax`` of its window, so a window whose spectrum reaches down towards that floor is re-solved
with a float64 SVD (:data:`REFINE_RATIO`); exact zero rows and columns give exact zero eigenvalues
and do not count towards that test. Every eigenvalue then equals a float64 SVD's to
``1e-9·λ + 8·eps·sqrt(λ·λmax)``. There is no float32 mode (see :data:`FLOAT32_REFUSED`).
Windows of equal shape are solved together, across layers, in memory-bounded chunks, on the weights'
device. Weights are only read (indexing copies them); no reference is kept.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from farms_lightning.engine.threads import parallel_map, single_threaded_ops
from farms_lightning.engine.windows import WindowGrid, farms_grid, validate_window_args

DTypeLike = Union[torch.dtype, str, None]

#: Upper bound on the float64 elements of the windows plus Gram matrices held at once per chunk.
CHUNK_ELEMENTS = 1 << 22


#: Windows whose smallest (non-structural) Gram eigenvalue is at or below this fraction of their
#: largest are re-solved with a float64 SVD. A float64 Gram matrix (``XᵀX`` formed, then ``eigvalsh``)
#: has an absolute error of ``c·eps·λmax`` at its small eigenvalues; measured on the real MiniLM
#: windows (100², 192², 384²) and Gaussian ones up to 1000², ``c <= 1.2``. Keeping every eigenvalue
#: to ``1e-9`` relative needs ``λmin/λmax >= c·eps·1e9 ≈ c·2.2e-7``; 1e-6 (``c = 4.5``) leaves a
#: margin of ~4 (the largest ratio at which a MiniLM window missed the bound unrefined: 1.5e-7).
REFINE_RATIO = 1e-6

#: Each layer (window set) first solves this many of its windows by Gram + refinement; when most of
#: them needed the SVD (square windows of trained weights often do, and nearly every 2000x2000 window
#: of the ``llm`` preset), its other windows go to the SVD directly, which is then cheaper than a Gram
#: solve followed by an SVD. The choice depends on the layer alone, so a layer's eigenvalues are the
#: same bits whatever it is analysed with (another model, another rank's share, another batch size).
PILOT_WINDOWS = 8


#: Why ``dtype=torch.float32`` is refused (measured with ``benchmarks/bench_farms.py`` and
#: ``benchmarks/small_eigenvalues.py`` on the real MiniLM, peak fits at windows 192 and 100).
FLOAT32_REFUSED = (
    "dtype=torch.float32 is not supported: a float32 Gram matrix loses the small eigenvalues the peak fit "
    "depends on (alphas up to 38% off float64 on real weights), and a float32 SVD, as accurate as the "
    "published float32 pipeline, is slower than the exact float64 default on a CPU; use None or torch.float64"
)


def resolve_dtype(dtype: DTypeLike) -> torch.dtype:
    """The eigen-solver dtype: ``None``/``torch.float64``/``"float64"`` (the only one).

    Every eigenvalue equals a float64 SVD's. A float32 mode was removed: see ``FLOAT32_REFUSED``.

    Raises:
        ValueError: ``torch.float32``/``"float32"`` (with the reason), or any other value.
    """
    if dtype is None:
        return torch.float64
    if isinstance(dtype, str):
        dtype = {"float64": torch.float64, "double": torch.float64, "float32": torch.float32,
                 "float": torch.float32}.get(dtype.removeprefix("torch."), dtype)  # type: ignore[arg-type]
    if dtype == torch.float64:
        return torch.float64
    if dtype == torch.float32:
        raise ValueError(FLOAT32_REFUSED)
    raise ValueError(f"`dtype` must be None or torch.float64, got {dtype!r}")


@dataclass
class WindowSet:
    """Windows cut from a stack of same-shaped matrices with one grid.

    ``matrices`` is ``(P, R, C)``: one matrix (P = 1) or the kernel-position matrices of a conv.
    Every ``(p, row_start, col_start)`` gives one window. Eigenvalues are pooled per *group*: all
    windows together, or (``group_by_row_start``) one group per row start (the conv blocks of §3).
    Eigenvalues are multiplied by ``scale``.
    """

    matrices: torch.Tensor
    grid: WindowGrid
    scale: float = 1.0
    group_by_row_start: bool = False
    pieces: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    #: How many of this set's windows the last solve solved by an SVD (float64: refined).
    refined_windows: int = 0

    @property
    def num_windows(self) -> int:
        """How many windows the set has (the rows of :meth:`window_index`)."""
        return len(self.matrices) * len(self.grid.row_starts) * len(self.grid.col_starts)

    @property
    def eigenvalues_per_group(self) -> int:
        """How many eigenvalues each pooled group gets (before any zero is dropped)."""
        return self.num_windows // self.num_groups * min(self.grid.rows, self.grid.cols)

    @property
    def num_groups(self) -> int:
        return len(self.grid.row_starts) if self.group_by_row_start else 1

    def window_index(self) -> torch.Tensor:
        """``(num_windows, 3)`` rows of (matrix, row start index, col start index)."""
        p, r, c = len(self.matrices), len(self.grid.row_starts), len(self.grid.col_starts)
        return torch.cartesian_prod(torch.arange(p), torch.arange(r), torch.arange(c)).reshape(-1, 3)

    def extract(self, index: torch.Tensor) -> torch.Tensor:
        """The windows named by ``index`` rows, as a ``(B, rows, cols)`` copy."""
        device = self.matrices.device
        row_starts = torch.tensor(self.grid.row_starts, device=device)[index[:, 1].to(device)]
        col_starts = torch.tensor(self.grid.col_starts, device=device)[index[:, 2].to(device)]
        rows = row_starts[:, None] + torch.arange(self.grid.rows, device=device)
        cols = col_starts[:, None] + torch.arange(self.grid.cols, device=device)
        mats = index[:, 0].to(device)
        return self.matrices[mats[:, None, None], rows[:, :, None], cols[:, None, :]]

    def eigenvalues(self) -> list[torch.Tensor]:
        """Per group, the pooled eigenvalues sorted ascending (float64, CPU)."""
        out = []
        for g in range(self.num_groups):
            parts = self.pieces.get(g, [])
            ev = torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)
            out.append(torch.sort(ev * self.scale).values)
        return out


def gram_eigenvalues(windows: torch.Tensor) -> torch.Tensor:
    """Float64 eigenvalues (ascending, >= 0) of the smaller Gram matrix of each ``(B, r, c)`` window."""
    x = windows.to(torch.float64)
    gram = x @ x.mT if x.shape[-2] <= x.shape[-1] else x.mT @ x
    return torch.linalg.eigvalsh(gram).clamp_min_(0)


def structural_zeros(windows: torch.Tensor) -> torch.Tensor:
    """Per window, how many of its ``min(r, c)`` singular values are exactly zero by structure.

    A window with only ``a`` non-zero rows and ``b`` non-zero columns has rank at most ``min(a, b)``.
    """
    nonzero = windows != 0
    rank_bound = torch.minimum(nonzero.any(dim=-1).sum(dim=-1), nonzero.any(dim=-2).sum(dim=-1))
    return min(windows.shape[-2:]) - rank_bound


def svd_eigenvalues(windows: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Squared singular values (ascending, float64) of each ``(B, r, c)`` window, SVD in ``dtype``."""
    return torch.linalg.svdvals(windows.to(dtype)).flip(-1).to(torch.float64).square()


def _gram_refined(windows: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram eigenvalues; windows whose smallest non-structural one is ``<= REFINE_RATIO·λmax`` by SVD."""
    ev = gram_eigenvalues(windows)
    size = ev.shape[-1]
    ev[torch.arange(size, device=ev.device) < zeros[:, None]] = 0.0
    smallest = ev.gather(1, zeros.clamp(max=size - 1)[:, None]).squeeze(1)
    refine = (smallest <= REFINE_RATIO * ev[:, -1]) & (zeros < size)
    if bool(refine.any()):
        ev[refine] = svd_eigenvalues(windows[refine])
    return ev, refine


def window_eigenvalues(windows: torch.Tensor, direct_svd: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, float64) of each ``(B, r, c)`` window, and which were solved by SVD.

    Gram eigenvalues, with windows whose smallest non-structural eigenvalue is
    ``<= REFINE_RATIO·λmax`` re-solved by a batched float64 SVD (with ``direct_svd``: every window
    by the SVD), so every value equals a float64 SVD's to ``1e-9·λ + 8·eps·sqrt(λ·λmax)``. The
    :func:`structural_zeros` of each window are exactly 0.
    """
    size = min(windows.shape[-2:])
    zeros = structural_zeros(windows)
    if direct_svd:
        ev, svd = svd_eigenvalues(windows), torch.ones(len(windows), dtype=torch.bool)
    else:
        ev, svd = _gram_refined(windows, zeros)
    ev[torch.arange(size, device=ev.device) < zeros.to(ev.device)[:, None]] = 0.0
    return ev, svd.cpu()


#: One piece of work: windows (index rows) of a set, and whether they go to the SVD directly.
_Part = tuple[WindowSet, torch.Tensor, bool]
#: ``on_solved(window_set, count)``: ``count`` more windows of the set are solved (called from workers).
OnSolved = Optional[Callable[[WindowSet, int], None]]


def compute_spectra(
    window_sets: list[WindowSet], dtype: DTypeLike = None, workers: int | None = None, on_solved: OnSolved = None
) -> list[list[torch.Tensor]]:
    """Solve all windows of all sets, batching windows of equal shape across sets.

    Two passes: every set's first :data:`PILOT_WINDOWS` windows, then the rest, by SVD directly for
    a set whose pilot windows mostly needed it. CPU batches are spread over ``workers`` threads
    (default: torch's thread count), each op on one intra-op thread (see
    :mod:`farms_lightning.engine.threads`). ``on_solved(set, count)`` hears of every solved batch, from
    the worker threads (progress bars). Returns, for each set, the sorted float64 eigenvalues of
    each of its groups.
    """
    resolve_dtype(dtype)  # validates: float64 is the only solver
    workers = workers or torch.get_num_threads()
    indices = []
    for ws in window_sets:
        ws.pieces = defaultdict(list)
        ws.refined_windows = 0
        indices.append(ws.window_index())
    _solve_parts([(ws, index[:PILOT_WINDOWS], False) for ws, index in zip(window_sets, indices)], workers, on_solved)
    rest = [(ws, index[PILOT_WINDOWS:], 2 * ws.refined_windows > PILOT_WINDOWS)
            for ws, index in zip(window_sets, indices) if len(index) > PILOT_WINDOWS]
    _solve_parts(rest, workers, on_solved)
    return [ws.eigenvalues() for ws in window_sets]


def _solve_parts(parts: list[_Part], workers: int, on_solved: OnSolved) -> None:
    """Solve every part, in batches of equal window shape (and solver) bounded by :data:`CHUNK_ELEMENTS`."""
    by_shape: dict[tuple, list[_Part]] = defaultdict(list)
    for ws, index, direct in parts:
        by_shape[(ws.grid.rows, ws.grid.cols, ws.matrices.device, direct)].append((ws, index, direct))
    batches: list[list[_Part]] = []
    any_cpu = False
    for (rows, cols, device, _), members in by_shape.items():
        total = sum(len(index) for _, index, _ in members)
        per_window = rows * cols + min(rows, cols) ** 2
        batch = max(1, CHUNK_ELEMENTS // per_window)
        if device.type == "cpu":  # equal batches, as many as a multiple of the workers: no thread idles
            count = -(-total // batch)
            batch = max(1, -(-total // (-(-count // workers) * workers)))
        # Work list of (set, index rows) slices, cut into batches of at most `batch` windows.
        pending: list[_Part] = []
        size = 0
        for ws, index, direct in members:
            for start in range(0, len(index), batch):
                part = index[start:start + batch]
                if size + len(part) > batch:
                    batches.append(pending)
                    pending, size = [], 0
                pending.append((ws, part, direct))
                size += len(part)
        if pending:
            batches.append(pending)
        any_cpu = any_cpu or device.type == "cpu"
    # Largest first (stable, so deterministic): the pool's last batches are then the short ones.
    batches.sort(key=_batch_cost, reverse=True)
    for pending, (ev, refined) in zip(batches, _solve_batches(batches, workers if any_cpu else 1, on_solved)):
        _distribute(pending, ev, refined)


def _batch_cost(pending: list[_Part]) -> int:
    """Flops of a batch's eigen-solves, up to a constant: windows x rows x cols x min(rows, cols)."""
    grid = pending[0][0].grid
    return sum(len(index) for _, index, _ in pending) * grid.rows * grid.cols * min(grid.rows, grid.cols)


def _solve_batches(
    batches: list[list[_Part]], workers: int, on_solved: OnSolved
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eigenvalues (float64, CPU) and SVD-solved masks of every batch; CPU batches run on a pool."""
    def solve(pending: list[_Part]) -> tuple[torch.Tensor, torch.Tensor]:
        windows = torch.cat([ws.extract(index) for ws, index, _ in pending])
        ev, refined = window_eigenvalues(windows, direct_svd=pending[0][2])
        result = ev.to(device="cpu"), refined.cpu()
        if on_solved is not None:
            for ws, index, _ in pending:
                on_solved(ws, len(index))
        return result

    with single_threaded_ops():
        return parallel_map(solve, batches, workers)


def _distribute(pending: list[_Part], ev: torch.Tensor, refined: torch.Tensor) -> None:
    offset = 0
    for ws, index, _ in pending:
        block = ev[offset:offset + len(index)]
        ws.refined_windows += int(refined[offset:offset + len(index)].sum())
        offset += len(index)
        if not ws.group_by_row_start:
            ws.pieces[0].append(block.reshape(-1))
            continue
        groups = index[:, 1]
        for g in torch.unique(groups).tolist():
            ws.pieces[g].append(block[groups == g].reshape(-1))


def _check_matrix(w: torch.Tensor) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"expected one 2-D weight tensor, got {shape}")
    return w.detach()


def farms_eigenvalues(
    w: torch.Tensor,
    window: int = 100,
    aspect_ratio: float = 1.0,
    windows_per_dim: int = 9,
    dtype: DTypeLike = None,
) -> torch.Tensor:
    """Pooled FARMS eigenvalues of one 2-D matrix, sorted ascending, float64, zeros kept.

    Args:
        w: a 2-D tensor, any float dtype and device; read only.
        window: window rows ``m`` (clamped to fit the matrix).
        aspect_ratio: ``Q = cols / rows`` of a window; window cols are ``int(m * Q)``.
        windows_per_dim: ``k`` window starts per dimension (``k x k`` windows at most).
        dtype: ``None``/``torch.float64`` (equal to a float64 SVD; ``torch.float32`` raises).

    Returns:
        A 1-D float64 CPU tensor; empty when the matrix cannot hold a 2 x 2 window.

    Raises:
        ValueError: ``w`` is not 2-D, or a setting is out of range.

    Example::

        >>> ev = farms_eigenvalues(torch.randn(300, 200), window=100, windows_per_dim=3)
        >>> ev.shape
        torch.Size([900])
    """
    w = _check_matrix(w)
    validate_window_args(window, aspect_ratio, windows_per_dim)
    grid = farms_grid(w.shape[0], w.shape[1], window, aspect_ratio, windows_per_dim)
    if grid is None:
        resolve_dtype(dtype)
        return torch.empty(0, dtype=torch.float64)
    with torch.no_grad():
        return compute_spectra([WindowSet(w.unsqueeze(0), grid)], dtype)[0][0]


def full_grid(rows: int, cols: int) -> WindowGrid:
    """One window covering the whole matrix: the plain (non-FARMS) ESD."""
    return WindowGrid(rows=rows, cols=cols, row_starts=(0,), col_starts=(0,))


def full_eigenvalues(w: torch.Tensor, dtype: DTypeLike = None) -> torch.Tensor:
    """The plain ESD of one 2-D matrix: its ``min(rows, cols)`` squared singular values.

    Sorted ascending, float64, CPU, zeros kept. Raises ``ValueError`` unless ``w`` is 2-D.

    Example::

        >>> full_eigenvalues(torch.eye(3)).tolist()
        [1.0, 1.0, 1.0]
    """
    w = _check_matrix(w)
    if w.numel() == 0:
        resolve_dtype(dtype)
        return torch.empty(0, dtype=torch.float64)
    with torch.no_grad():
        return compute_spectra([WindowSet(w.unsqueeze(0), full_grid(*w.shape))], dtype)[0][0]
