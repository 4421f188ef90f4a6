"""The benchmark's measuring tools: the timer (best of runs, peak extra RSS), the table and comparisons."""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, Callable

from farms_lightning import analyze as _analyze


def analyze(*args: Any, **kwargs: Any) -> Any:
    """The engine without the random-matrix baseline, as the published pipelines it is compared with."""
    return _analyze(*args, random_baseline=False, **kwargs)


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


def max_rel_diff(got: dict[str, float], ref: dict[str, float]) -> float:
    common = [n for n in ref if n in got and got[n] is not None and ref[n] is not None]
    return max((abs(got[n] - ref[n]) / abs(ref[n]) for n in common), default=math.nan)


def alphas(report) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return {s.name: s.alpha for s in report.layers}


def print_table(rows: list[tuple[str, float, float | None, float, float]]) -> None:
    print("\n| work | seconds | speed-up vs baseline | max rel. Δalpha vs float64 | extra MB |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, ratio, dalpha, mb in rows:
        ratio_s = "" if ratio is None else f"{ratio:.2f}x"
        dalpha_s = "" if math.isnan(dalpha) else f"{dalpha:.1e}"
        mb_s = "" if math.isnan(mb) else f"{mb:.0f}"
        print(f"| {name} | {seconds:.3f} | {ratio_s} | {dalpha_s} | {mb_s} |")
