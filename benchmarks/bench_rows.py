"""The benchmark's rows: GPT-2 small, ResNet-18 and MiniLM against the published pipeline and WeightWatcher,
the whole-matrix metrics, and the callback's per-epoch analysis."""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
from bench_common import alphas, analyze, max_rel_diff, measure
from bench_models import ResNet18, gpt2_small_blocks, minilm, rank_deficient_models
from bench_published import (
    bare_gram_eigvalsh,
    float32_peak_alphas,
    published_pipeline,
    refinement_disabled,
    window_stack,
)
from torch import nn

from farms_lightning.engine.threads import single_threaded_ops


def callback_analysis(model: nn.Module, with_baseline: bool, first: bool = False) -> Callable[[], Any]:
    """FARMSCallback's per-epoch analysis (default settings); ``first``: with an empty baseline cache."""
    from farms_lightning.engine import baseline
    from farms_lightning.engine.analysis import resolve_settings
    from farms_lightning.engine.distributed import analyze_distributed

    settings = resolve_settings(random_baseline=with_baseline)

    def run() -> Any:
        if first:
            baseline.clear_cache()
        return analyze_distributed(model, settings, frozen_cache={})[0]

    return run


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
    from farms_lightning.engine.matrix_metrics import lambda_max

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
    from farms_lightning.engine.analysis import analyze_layers, resolve_settings
    from farms_lightning.models.layers import discover_layers

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
