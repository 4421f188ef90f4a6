"""Eigenvalues of weight windows, batched: FARMS pooled ESDs and plain full ESDs.

Every window ``X`` gives the ``min(rows, cols)`` eigenvalues of its smaller Gram matrix
(``X Xᵀ`` or ``Xᵀ X``), i.e. its squared singular values, computed in float64 from the weights as
stored (bf16/fp16/fp32 upcast exactly). A Gram matrix resolves eigenvalues only to a small multiple
of ``eps·λmax`` of its window, so a window whose spectrum reaches down towards that floor is re-solved
with a float64 SVD (:data:`REFINE_RATIO`); exact zero rows and columns give exact zero eigenvalues
and do not count towards that test. Every eigenvalue then equals a float64 SVD's to
``1e-9·λ + 8·eps·sqrt(λ·λmax)``; :func:`analyze` defers that SVD and refines only where a result
depends on it (:mod:`farms_lightning.engine.certificate`). The per-window solvers live in
:mod:`farms_lightning.engine.window_solvers`. There is no float32 mode (see :data:`FLOAT32_REFUSED`).
Windows of equal shape are solved together, across layers, in memory-bounded chunks, on the weights'
device. Weights are only read (indexing copies them); no reference is kept.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from farms_lightning.engine import shared_gram
from farms_lightning.engine.threads import parallel_map, single_threaded_ops
from farms_lightning.engine.window_solvers import (  # noqa: F401 - re-exported: the solvers' public names
    FLOAT32_REFUSED,
    GRAM_ERROR_FACTOR,
    REFINE_RATIO,
    DTypeLike,
    _solve_windows,
    finish_gram_eigenvalues,
    gram_eigenvalues,
    resolve_dtype,
    structural_zeros,
    svd_eigenvalues,
    window_eigenvalues,
)
from farms_lightning.engine.windows import WindowGrid, farms_grid, validate_window_args

#: Upper bound on the float64 elements of the windows plus Gram matrices held at once per chunk
#: (8 MiB: 1 << 22 was 17% slower on GPT-2's 100x100 windows, the chunks no longer fitting in cache).
CHUNK_ELEMENTS = 1 << 20


#: Overlapping windows are built from shared pieces only when the Gram matrices of a whole band fit
#: in this many float64 elements (64 MiB: ten 768x768 windows of GPT-2's llm preset, not 2000x2000).
BAND_ELEMENTS = 1 << 23
#: What one worker's batch may hold, for memory budgets (``--max-memory``): windows, their float64
#: copies and Gram matrices, and eigvalsh's workspace (96 MiB).
SOLVER_BYTES_PER_WORKER = 3 * 8 * (1 << 22)

#: Each layer (window set) first solves this many of its windows by Gram + refinement; when most of
#: them needed the SVD (square windows of trained weights often do, and nearly every 2000x2000 window
#: of the ``llm`` preset), its other windows go to the SVD directly, which is then cheaper than a Gram
#: solve followed by an SVD. The choice depends on the layer alone, so a layer's eigenvalues are the
#: same bits whatever it is analysed with (another model, another rank's share, another batch size).
PILOT_WINDOWS = 8


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
    #: ``(num_windows, min(rows, cols))`` eigenvalues of each window, ascending (set by a solve).
    window_values: Optional[torch.Tensor] = None
    #: Per eigenvalue, the absolute error bound of a deferred Gram value (0: equal to the SVD's to 1e-9).
    window_errors: Optional[torch.Tensor] = None
    #: How many of this set's windows the last solve solved by an SVD (float64: refined).
    refined_windows: int = 0
    _index: Optional[torch.Tensor] = field(default=None, repr=False)

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
        if self._index is None:
            p, r, c = len(self.matrices), len(self.grid.row_starts), len(self.grid.col_starts)
            self._index = torch.cartesian_prod(torch.arange(p), torch.arange(r), torch.arange(c)).reshape(-1, 3)
        return self._index

    def reset(self) -> None:
        """Forget the last solve: every window unsolved."""
        size = min(self.grid.rows, self.grid.cols)
        self.window_values = torch.zeros(self.num_windows, size, dtype=torch.float64)
        self.window_errors = torch.zeros(self.num_windows, size, dtype=torch.float64)
        self.refined_windows = 0

    @property
    def pending(self) -> torch.Tensor:
        """Window numbers whose Gram eigenvalues were kept unrefined with an error bound (deferred)."""
        if self.window_errors is None:
            return torch.empty(0, dtype=torch.long)
        return torch.nonzero(self.window_errors.amax(dim=1) > 0).reshape(-1)

    def extract_into(self, out: torch.Tensor, index: torch.Tensor) -> None:
        """Copy the windows named by ``index`` rows into ``out`` (``(B, rows, cols)``, any dtype).

        One strided copy per window (converting the dtype on the way): much cheaper than a gather.
        """
        rows, cols = self.grid.rows, self.grid.cols
        for target, (p, r, c) in zip(out, index.tolist()):
            start, col = self.grid.row_starts[r], self.grid.col_starts[c]
            target.copy_(self.matrices[p, start:start + rows, col:col + cols])

    def extract(self, index: torch.Tensor) -> torch.Tensor:
        """The windows named by ``index`` rows, as a ``(B, rows, cols)`` copy in the stored dtype."""
        out = torch.empty((len(index), self.grid.rows, self.grid.cols), dtype=self.matrices.dtype,
                          device=self.matrices.device)
        self.extract_into(out, index)
        return out

    def first_suspects(self) -> torch.Tensor:
        """Deferred windows most likely to decide a certificate: refining them alone often settles it.

        Per group, the window holding the smallest uncertain value (it sets the peak fit's histogram
        range), and every deferred window whose smallest value is within twice its error bound of
        zero (it may be a numerical zero, which changes the counts).
        """
        if self.window_values is None or self.window_errors is None:
            return torch.empty(0, dtype=torch.long)
        uncertain = self.window_errors > 0
        smallest = torch.where(uncertain, self.window_values, torch.inf).amin(dim=1)
        suspects = smallest <= 2 * self.window_errors.amax(dim=1)
        rows = self.window_index()[:, 1]
        for g in range(self.num_groups):
            chosen = rows == g if self.group_by_row_start else torch.ones_like(rows, dtype=torch.bool)
            lowest = torch.where(chosen, smallest, torch.inf)
            if bool(torch.isfinite(lowest).any()):
                suspects[int(torch.argmin(lowest))] = True
        return torch.nonzero(suspects & (self.window_errors.amax(dim=1) > 0)).reshape(-1)

    def eigenvalues(self) -> list[torch.Tensor]:
        """Per group, the pooled eigenvalues sorted ascending (float64, CPU)."""
        return [values for values, _ in self.eigenvalues_with_errors()]

    def eigenvalues_with_errors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per group, the pooled eigenvalues sorted ascending and each one's absolute error bound.

        The bound is 0 for every value that equals a float64 SVD's (to ``1e-9·λ``); only deferred
        Gram values (:func:`compute_spectra` with ``defer_refinement``) carry one.
        """
        if self.window_values is None or self.window_errors is None:
            raise RuntimeError("the window set has not been solved")
        rows = self.window_index()[:, 1]
        out = []
        for g in range(self.num_groups):
            chosen = rows == g if self.group_by_row_start else slice(None)
            values, order = torch.sort(self.window_values[chosen].reshape(-1) * self.scale, stable=True)
            out.append((values, self.window_errors[chosen].reshape(-1)[order] * self.scale))
        return out


#: One piece of work: window numbers of a set, and how they are solved: ``"gram"`` (Gram, refined by
#: the SVD where needed), ``"svd"`` (the SVD directly) or ``"defer"`` (Gram, refinement deferred).
_Part = tuple[WindowSet, torch.Tensor, str]
#: ``on_solved(window_set, count)``: ``count`` more windows of the set are solved (called from workers).
OnSolved = Optional[Callable[[WindowSet, int], None]]


def compute_spectra(
    window_sets: list[WindowSet], dtype: DTypeLike = None, workers: int | None = None, on_solved: OnSolved = None,
    defer_refinement: bool = False,
) -> list[list[torch.Tensor]]:
    """Solve all windows of all sets (:func:`solve_window_sets`); per set, its groups' sorted eigenvalues."""
    solve_window_sets(window_sets, dtype, workers, on_solved, defer_refinement)
    return [ws.eigenvalues() for ws in window_sets]


def solve_window_sets(
    window_sets: list[WindowSet], dtype: DTypeLike = None, workers: int | None = None, on_solved: OnSolved = None,
    defer_refinement: bool = False,
) -> None:
    """Solve all windows of all sets, batching windows of equal shape across sets (results in the sets).

    Two passes: every set's first :data:`PILOT_WINDOWS` windows, then the rest, by SVD directly for
    a set whose pilot windows mostly needed it. With ``defer_refinement`` one pass, by Gram
    matrices only: nearly singular windows keep their Gram values with error bounds
    (:meth:`WindowSet.eigenvalues_with_errors`) until :func:`refine_deferred`. CPU batches are
    spread over ``workers`` threads (default: torch's thread count), each op on one intra-op thread
    (see :mod:`farms_lightning.engine.threads`). ``on_solved(set, count)`` hears of every solved
    batch, from the worker threads (progress bars).
    """
    resolve_dtype(dtype)  # validates: float64 is the only solver
    workers = workers or torch.get_num_threads()
    numbers = []
    for ws in window_sets:
        ws.reset()
        numbers.append(torch.arange(ws.num_windows))
    if defer_refinement:
        _solve_parts([(ws, n, "defer") for ws, n in zip(window_sets, numbers)], workers, on_solved)
        return
    _solve_parts([(ws, n[:PILOT_WINDOWS], "gram") for ws, n in zip(window_sets, numbers)], workers, on_solved)
    rest = [(ws, n[PILOT_WINDOWS:], "svd" if 2 * ws.refined_windows > PILOT_WINDOWS else "gram")
            for ws, n in zip(window_sets, numbers) if len(n) > PILOT_WINDOWS]
    _solve_parts(rest, workers, on_solved)


def refine_deferred(
    window_sets: list[WindowSet], workers: int | None = None, windows: Optional[list[torch.Tensor]] = None
) -> list[list[torch.Tensor]]:
    """Re-solve by a float64 SVD the deferred windows (all, or each set's ``windows``); the new spectra."""
    chosen = windows if windows is not None else [ws.pending for ws in window_sets]
    parts = [(ws, numbers, "svd") for ws, numbers in zip(window_sets, chosen)]
    _solve_parts([part for part in parts if len(part[1])], workers or torch.get_num_threads(), None)
    return [ws.eigenvalues() for ws in window_sets]


def _solve_parts(parts: list[_Part], workers: int, on_solved: OnSolved) -> None:
    """Solve every part, in batches of equal window shape (and solver) bounded by :data:`CHUNK_ELEMENTS`.

    Overlapping windows solved by Gram matrices go in batches of one band each, built from shared
    pieces (:mod:`farms_lightning.engine.shared_gram`).
    """
    by_shape: dict[tuple, list[_Part]] = defaultdict(list)
    batches: list[list[_Part]] = []
    for ws, numbers, mode in parts:
        if mode != "svd" and len(numbers) > 1 and shared_gram.overlap(ws.grid) >= shared_gram.MIN_OVERLAP:
            bands: dict[tuple[int, int], list[int]] = defaultdict(list)
            for number, row in zip(numbers.tolist(), ws.window_index()[numbers]):
                bands[shared_gram.band_key(ws.grid, row)].append(number)
            outer = min(ws.grid.rows, ws.grid.cols)
            # Only bands whose Gram matrices fit together: for larger windows (2000x2000) the shared
            # products, memory-bound, were slower than direct ones on two busy cores (80 s vs 54 s).
            if max(map(len, bands.values())) * outer ** 2 <= BAND_ELEMENTS:
                batches += [[(ws, torch.tensor(band), mode + ":shared")] for band in bands.values()]
                continue
        by_shape[(ws.grid.rows, ws.grid.cols, ws.matrices.device, mode)].append((ws, numbers, mode))
    any_cpu = False
    for (rows, cols, device, _), members in by_shape.items():
        total = sum(len(numbers) for _, numbers, _ in members)
        per_window = rows * cols + min(rows, cols) ** 2
        batch = max(1, CHUNK_ELEMENTS // per_window)
        if device.type == "cpu":  # equal batches, as many as a multiple of the workers: no thread idles
            count = -(-total // batch)
            batch = max(1, -(-total // (-(-count // workers) * workers)))
        # Work list of (set, window numbers) slices, cut into batches of at most `batch` windows.
        pending: list[_Part] = []
        size = 0
        for ws, numbers, mode in members:
            for start in range(0, len(numbers), batch):
                part = numbers[start:start + batch]
                if size + len(part) > batch:
                    batches.append(pending)
                    pending, size = [], 0
                pending.append((ws, part, mode))
                size += len(part)
        if pending:
            batches.append(pending)
        any_cpu = any_cpu or device.type == "cpu"
    # Largest first (stable, so deterministic): the pool's last batches are then the short ones.
    batches.sort(key=_batch_cost, reverse=True)
    for pending, solved in zip(batches, _solve_batches(batches, workers if any_cpu else 1, on_solved)):
        _distribute(pending, *solved)


def _batch_cost(pending: list[_Part]) -> int:
    """Flops of a batch's eigen-solves, up to a constant: windows x rows x cols x min(rows, cols)."""
    grid = pending[0][0].grid
    return sum(len(numbers) for _, numbers, _ in pending) * grid.rows * grid.cols * min(grid.rows, grid.cols)


def _solve_batches(
    batches: list[list[_Part]], workers: int, on_solved: OnSolved
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Eigenvalues, SVD-solved masks and error bounds (CPU) of every batch; CPU batches run on a pool."""
    def solve(pending: list[_Part]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        first, mode = pending[0][0], pending[0][2]
        if mode.endswith(":shared"):
            return _solve_band(first, pending[0][1], mode.removesuffix(":shared"), on_solved)
        windows = torch.empty((sum(len(numbers) for _, numbers, _ in pending), first.grid.rows, first.grid.cols),
                              dtype=torch.float64, device=first.matrices.device)
        offset = 0
        for ws, numbers, _ in pending:  # float64 copies of the windows (exact upcast), in one buffer
            ws.extract_into(windows[offset:offset + len(numbers)], ws.window_index()[numbers])
            offset += len(numbers)
        ev, refined, errors = _solve_windows(windows, pending[0][2])
        result = ev.cpu(), refined.cpu(), errors.cpu()
        if on_solved is not None:
            for ws, numbers, _ in pending:
                on_solved(ws, len(numbers))
        return result

    with single_threaded_ops():
        return parallel_map(solve, batches, workers)


def _solve_band(
    ws: WindowSet, numbers: torch.Tensor, mode: str, on_solved: OnSolved
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One band of overlapping windows: Gram matrices from shared pieces, then as any Gram solve."""
    index = ws.window_index()[numbers]
    grams, zeros = shared_gram.band_grams(ws.matrices, ws.grid, index)
    ev = torch.linalg.eigvalsh(grams).clamp_min_(0)
    del grams
    ev, refined, errors = finish_gram_eigenvalues(ev, zeros, mode, max(ws.grid.rows, ws.grid.cols),
                                                  lambda chosen: ws.extract(index[chosen.cpu()]).to(torch.float64))
    if on_solved is not None:
        on_solved(ws, len(numbers))
    return ev.cpu(), refined.cpu(), errors.cpu()


def _distribute(pending: list[_Part], ev: torch.Tensor, refined: torch.Tensor, errors: torch.Tensor) -> None:
    offset = 0
    for ws, numbers, _ in pending:
        assert ws.window_values is not None and ws.window_errors is not None
        end = offset + len(numbers)
        ws.window_values[numbers] = ev[offset:end]
        ws.window_errors[numbers] = errors[offset:end]
        ws.refined_windows += int(refined[offset:end].sum())
        offset = end


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
