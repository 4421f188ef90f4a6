"""LLM-scale rows of the benchmark: a LLaMA-7B block at the llm preset, and streaming memory.

Run through ``bench_farms.py --llm`` (timing) and ``--stream-gb N`` (memory); alone:

    python benchmarks/bench_llm.py --device cpu --stream-gb 4      # add --tiny to check that it runs

- LLaMA-7B block: one matrix of each shape of a block (q/k/v/o 4096x4096, gate/up 11008x4096,
  down 4096x11008), random Student-t(3) weights in float16, analysed at the ``llm`` preset (m=2000,
  Q=1, k=10: 100 windows of 2000x2000 per matrix, float64 Gram + eigvalsh, peak fit) on the chosen
  device. A block is projected as 4 x t(4096x4096) + 2 x t(11008x4096) + t(4096x11008), the
  model as 32 blocks.
- Streaming: ``farms-lightning analyze`` of a generated sharded safetensors checkpoint (float16
  4096x4096 matrices, 1 GiB shards) in a child process: its peak RSS (``VmHWM``, the kernel's
  high-water mark) and peak ``RssAnon`` (memory that is not a mapped file), both read from
  ``/proc`` every 2 ms, against the size, next to the same run on a one-matrix checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from farms_lightning import analyze
from farms_lightning.engine.baseline import BASELINE_DRAWS
from farms_lightning.models.state_dict import model_from_state_dict

#: The matrices of one LLaMA-7B block, as (out, in), and how many of each shape it has.
LLAMA_7B_BLOCK = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}
LLAMA_7B_BLOCKS = 32
GiB = 1 << 30


def heavy_tailed(shape: tuple[int, int], seed: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Student-t(3) entries scaled by 1/sqrt(in): bulk plus a heavy tail, like trained weights."""
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(shape, generator=g)
    chi = torch.zeros(shape)
    for _ in range(3):
        chi += torch.randn(shape, generator=g).pow_(2)
    return (gauss / (chi / 3).sqrt_() / math.sqrt(shape[1])).to(dtype)


def llama_block_rows(device: str, tiny: bool, add: Callable[[str, float, float], None],
                     measure: Callable) -> None:
    """Seconds per matrix shape at the llm preset; projected seconds per block and hours per model."""
    total = once = 0.0
    for i, (shape, count) in enumerate(LLAMA_7B_BLOCK.items()):
        real = (shape[0] // 16, shape[1] // 16) if tiny else shape
        model = model_from_state_dict({"proj.weight": heavy_tailed(real, seed=i).to(device)})
        # The random baseline is paid once per shape (cached), so it is projected apart from the blocks.
        seconds, mb, report = measure(lambda: analyze(model, "llm", random_baseline=False), 1)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        add(f"LLaMA-7B {real[0]}x{real[1]} (float16), llm preset on {device}: one matrix "
            f"(alpha {report['proj'].alpha:.3f}, lambda_max included)", seconds, mb)
        total += count * seconds
        once += BASELINE_DRAWS * seconds
    add(f"LLaMA-7B block on {device} (projected: 4 q/k/v/o + 2 gate/up + 1 down)", total, math.nan)
    add(f"LLaMA-7B random baseline on {device}, once per model (projected: {BASELINE_DRAWS} draws of each of the "
        f"3 shapes)", once, math.nan)
    whole = total * LLAMA_7B_BLOCKS + once
    add(f"LLaMA-7B whole model on {device} (projected, {LLAMA_7B_BLOCKS} blocks + baseline): "
        f"{whole / 3600:.2f} hours", whole, math.nan)


def llama_gram_rows(device: str, tiny: bool, add: Callable[..., None]) -> None:
    """One LLaMA-7B 4096x4096 matrix at the llm preset against the Gram-only solve of its windows.

    The Gram-only solve is the float64 Gram + ``eigvalsh`` of the same 100 windows (2000x2000), one
    intra-op thread per window, the windows spread over the cores (the fastest way on a CPU, and the
    engine's own way); ``analyze`` adds the peak fit, the refinement certificate and the exact
    whole-matrix ``lambda_max``. Target: at most 1.3x.
    """
    from bench_common import measure
    from bench_published import float64_floor

    from farms_lightning.engine.windows import farms_grid

    n = 4096 // 16 if tiny else 4096
    w = heavy_tailed((n, n), seed=0).to(device)
    grid = farms_grid(n, n, 2000, 1.0, 10)
    assert grid is not None
    rows = torch.tensor(grid.row_starts)[:, None] + torch.arange(grid.rows)
    cols = torch.tensor(grid.col_starts)[:, None] + torch.arange(grid.cols)
    stacks = [w[r][:, cols[j]][None] for r in rows for j in range(len(cols))]
    t_gram, mb, _ = measure(lambda: float64_floor(stacks, torch.get_num_threads(), chunk=1), 1)
    add(f"LLaMA-7B {n}x{n} (float16), llm preset windows: Gram-only float64 solve, spread over the cores",
        t_gram, mb)
    model = model_from_state_dict({"proj.weight": w})
    t, mb, _ = measure(lambda: analyze(model, "llm", random_baseline=False), 1)
    add(f"LLaMA-7B {n}x{n}, llm preset: analyze (peak fit, lambda_max included; target <= 1.3x)", t, mb, t_gram)


def generate_checkpoint(folder: Path, size: int, shape: tuple[int, int] = (4096, 4096), shard: int = GiB) -> int:
    """A sharded safetensors checkpoint of about ``size`` bytes of float16 matrices; its real size."""
    from safetensors.torch import save_file

    per_matrix = shape[0] * shape[1] * 2
    per_shard = max(1, shard // per_matrix)
    count = max(1, size // per_matrix)
    for start in range(0, count, per_shard):
        tensors = {f"model.layers.{i}.proj.weight": heavy_tailed(shape, seed=i)
                   for i in range(start, min(count, start + per_shard))}
        save_file(tensors, str(folder / f"model-{start // per_shard:05d}.safetensors"))
    return sum(p.stat().st_size for p in folder.iterdir())


def peak_memory(argv: list[str]) -> tuple[float, int, int]:
    """Run ``farms-lightning argv`` in a child: seconds, peak RSS and peak RssAnon (bytes)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "farms_lightning.cli", *argv], stdout=subprocess.DEVNULL)
    # VmHWM, not the child's ru_maxrss: that one also counts the parent's pages at the fork.
    peak = {"VmHWM:": 0, "RssAnon:": 0}
    while True:
        pid, status, _ = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        try:
            with open(f"/proc/{child.pid}/status") as f:
                for line in f:
                    key = line.split(maxsplit=1)[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]) * 1024)
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.002)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"farms-lightning {' '.join(argv)} failed")
    return time.perf_counter() - start, peak["VmHWM:"], peak["RssAnon:"]


def streaming_rows(size_gb: float, add: Callable[[str, float, float], None], tiny: bool = False) -> None:
    """Peak memory of a streaming ``analyze`` of a generated checkpoint of ``size_gb`` GB."""
    with tempfile.TemporaryDirectory(prefix="farms-stream-") as tmp:
        folder = Path(tmp) / "checkpoint"
        folder.mkdir()
        shape = (256, 256) if tiny else (4096, 4096)
        size = generate_checkpoint(folder, int(size_gb * GiB), shape, shard=GiB // 64 if tiny else GiB)
        shards = len(list(folder.iterdir()))
        small = Path(tmp) / "one-matrix"
        small.mkdir()
        generate_checkpoint(small, 1, shape)  # the same run on one matrix: the process's own footprint

        def run(checkpoint: Path) -> tuple[float, int, int]:
            return peak_memory(["analyze", str(checkpoint), "--preset", "cv", "--device", "cpu",
                                "--format", "json", "-o", str(Path(tmp) / f"{checkpoint.name}.json")])

        _, rss0, anon0 = run(small)
        seconds, rss, anon = run(folder)
        name = f"streaming analyze of a {size / GiB:.2f} GiB checkpoint ({shards} safetensors shards)"
        add(f"{name}: peak RSS {rss / GiB:.2f} GiB (one matrix: {rss0 / GiB:.2f})", seconds, rss / 2**20)
        add(f"{name}: peak RssAnon {anon / GiB:.2f} GiB (one matrix: {anon0 / GiB:.2f}); growth "
            f"{(anon - anon0) / 2**20:.0f} MiB = {(anon - anon0) / size:.3f}x the checkpoint", seconds, anon / 2**20)


def main() -> None:
    from bench_common import measure  # the benchmark's own timer (best of runs, peak extra RSS)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stream-gb", type=float, default=4.0, help="checkpoint size for the memory rows (0: none)")
    parser.add_argument("--tiny", action="store_true", help="1/16 of each dimension: checks that the rows run")
    args = parser.parse_args()

    def add(name: str, seconds: float, mb: float) -> None:
        print(f"| {name} | {seconds:.3f} | {'' if math.isnan(mb) else f'{mb:.0f}'} |", flush=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n| work | seconds | MB |\n|---|---:|---:|")
    llama_block_rows(args.device, args.tiny, add, measure)
    if args.stream_gb:
        streaming_rows(args.stream_gb, add, args.tiny)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
