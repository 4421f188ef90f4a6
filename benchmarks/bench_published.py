"""The pipelines farms_lightning is compared with: the published FARMS code (transcribed) and bare solves."""

from __future__ import annotations

import torch
from torch import nn

from farms_lightning.engine import window_solvers
from farms_lightning.engine.windows import farms_grid
from farms_lightning.functional import fit_power_law


def published_fit(evals: torch.Tensor, method: str) -> float:
    """The references' per-candidate loop (AlphaPruning/FARMS esd_utils), on the CPU."""
    nz = evals[evals > 0]
    n_all = len(nz)
    if method == "median":
        i = n_all // 2
        n = float(n_all - i)
        return float(1 + n / (torch.sum(torch.log(nz[i:])) - n * torch.log(nz[i])))
    alphas = torch.zeros(n_all - 1)
    ds = torch.ones(n_all - 1)
    if method == "peak":
        log_evals = torch.log10(nz)
        lo_e, hi_e = log_evals.min(), log_evals.max()
        counts = torch.histc(log_evals, 100, min=float(lo_e), max=float(hi_e))
        edges = torch.linspace(float(lo_e), float(hi_e), 101)
        peak = 10 ** edges[torch.argmax(counts)]
        xmin_min, xmin_max = torch.log10(0.95 * peak), 1.5 * peak
    for i, xmin in enumerate(nz[:-1]):
        if method == "peak":
            if xmin < xmin_min:
                continue
            if xmin > xmin_max:
                break
        n = float(n_all - i)
        seq = torch.arange(n)
        alpha = 1 + n / (torch.sum(torch.log(nz[i:])) - n * torch.log(xmin))
        alphas[i] = alpha
        if alpha > 1:
            ds[i] = torch.max(torch.abs(1 - (nz[i:] / xmin) ** (-alpha + 1) - seq / n))
    return float(alphas[torch.argmin(ds)])


def published_pipeline(model: nn.Module, m: int, k: int, fit: str | None) -> dict[str, float]:
    """Per-window float32 ``svdvals`` loop, pooled, then the per-candidate fit loop."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight.detach().float()
        grid = farms_grid(*w.shape, m, 1.0, k)
        evals = [torch.linalg.svdvals(w[r:r + grid.rows, c:c + grid.cols]) ** 2
                 for r in grid.row_starts for c in grid.col_starts]
        ev = torch.sort(torch.cat(evals)).values
        if fit is not None:
            out[name] = published_fit(ev, fit)
    return out


def bare_gram_eigvalsh(model: nn.Module, m: int, k: int, dtype: torch.dtype) -> None:
    """The same windows, batched: one Gram + ``eigvalsh`` call per shape (extraction included)."""
    x = torch.cat(window_stack(model, m, k)).to(dtype)
    torch.linalg.eigvalsh(x @ x.mT)


def window_stack(model: nn.Module, m: int, k: int) -> list[torch.Tensor]:
    """Per Linear layer, its ``(windows, m, m)`` FARMS windows (Q = 1) as stored."""
    out = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight.detach()
            grid = farms_grid(*w.shape, m, 1.0, k)
            rows = torch.tensor(grid.row_starts)[:, None] + torch.arange(grid.rows)
            cols = torch.tensor(grid.col_starts)[:, None] + torch.arange(grid.cols)
            out.append(w[rows[:, None, :, None], cols[None, :, None, :]].reshape(-1, grid.rows, grid.cols))
    return out


def float32_peak_alphas(stacks: list[torch.Tensor], names: list[str], solver: str) -> dict[str, float]:
    """Peak alphas from float32 eigenvalues: ``svd_loop`` (the published per-window float32
    ``svdvals``), ``svd_batched`` (the same, one batched call per layer) or ``gram`` (float32 Gram +
    ``eigvalsh``, the removed float32 mode). The fit is farms_lightning's (float64, exact)."""
    out = {}
    for name, x in zip(names, stacks):
        x32 = x.float()
        if solver == "svd_loop":
            ev = torch.cat([torch.linalg.svdvals(window) for window in x32]).square()
        elif solver == "svd_batched":
            ev = torch.linalg.svdvals(x32).square()
        else:
            ev = torch.linalg.eigvalsh(x32 @ x32.mT).clamp_min(0)
        out[name] = fit_power_law(ev.reshape(-1).double(), "peak").alpha
    return out


class refinement_disabled:
    """Within the block no window is re-solved by the float64 SVD (Gram eigenvalues only)."""

    def __enter__(self) -> None:
        self.saved = window_solvers.REFINE_RATIO
        window_solvers.REFINE_RATIO = -1.0

    def __exit__(self, *exc: object) -> None:
        window_solvers.REFINE_RATIO = self.saved


def published_cnn_alphas(model: nn.Module, k: int = 9) -> dict[str, float]:
    """The published CNN path (FARMS ``Tempbalance_FARMS.net_esd_estimator`` with the sliding window,
    ``Q = 1``, median fit), transcribed: per conv, its kernel-position matrices (transposed tall),
    ``rows // cols`` blocks of ``cols x cols`` scaled by sqrt(0.5), a float32 ``svdvals`` per block
    and kernel position, one median fit per block (the reference's loop), the layer alpha their mean.
    Linear layers: ``k x k`` fixed windows (its ``fixed_sampling``), float32 ``svdvals`` each."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            w = module.weight.detach().float()
            mats = [w[:, :, i, j] for i in range(w.shape[2]) for j in range(w.shape[3])]
            mats = [m.T if m.shape[0] < m.shape[1] else m for m in mats]
            rows, cols = mats[0].shape
            block_alphas = []
            for b in range(rows // cols):
                ev = torch.cat([torch.linalg.svdvals(m[b * cols:(b + 1) * cols, :cols] * 0.5 ** 0.5).square()
                                for m in mats])
                block_alphas.append(published_fit(torch.sort(ev).values, "median"))
            out[name] = sum(block_alphas) / len(block_alphas)
        elif isinstance(module, nn.Linear):
            w = module.weight.detach().float()
            grid = farms_grid(*w.shape, 100, 1.0, k)
            ev = torch.cat([torch.linalg.svdvals(w[r:r + grid.rows, c:c + grid.cols]).square()
                            for r in grid.row_starts for c in grid.col_starts])
            out[name] = published_fit(torch.sort(ev).values, "median")
    return out


def float64_floor(stacks: list[torch.Tensor], workers: int, chunk: int = 64) -> None:
    """Float64 Gram + ``eigvalsh`` of the windows, the fastest way the machine allows: one intra-op
    thread per solve, chunks of ``chunk`` windows spread over ``workers`` threads (as the engine)."""
    from farms_lightning.engine.threads import parallel_map, single_threaded_ops

    chunks = [x[i:i + chunk] for x in stacks for i in range(0, len(x), chunk)]

    def solve(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return torch.linalg.eigvalsh(x @ x.mT)

    with single_threaded_ops():
        parallel_map(solve, chunks, workers)


def exact_full_esd_limit(model: nn.Module, workers: int) -> None:
    """The exact limit of full ESDs: per matrix a float64 Gram + ``eigvalsh`` when it is well conditioned
    (its smallest eigenvalue above 1e-6 of the largest, as the engine's test), else a float64 ``svdvals``;
    one intra-op thread per solve, the matrices spread over ``workers`` threads."""
    from farms_lightning.engine.threads import parallel_map, single_threaded_ops

    mats = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]

    def solve(w: torch.Tensor) -> torch.Tensor:
        x = w.double()
        ev = torch.linalg.eigvalsh(x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x)
        if ev[0] <= 1e-6 * ev[-1]:
            return torch.linalg.svdvals(x).square()
        return ev

    with single_threaded_ops():
        parallel_map(solve, mats, workers)
