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
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import measure, print_table  # noqa: E402
from bench_models import ResNet18, gpt2_small_blocks  # noqa: E402
from bench_rows import callback_rows, model_rows, whole_matrix_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="skip the slow published ks loop and MiniLM training")
    parser.add_argument("--only", choices=["whole-matrix", "callback", "targets"], help="run only these rows")
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
    if args.only == "targets":
        from bench_targets import target_rows

        target_rows(add, r, args.quick)
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
        from bench_llm import llama_block_rows, llama_gram_rows, streaming_rows

        if args.llm:
            llama_gram_rows(args.llm_device, args.tiny, lambda name, s, mb, base=None: add(name, s, mb, base))
            llama_block_rows(args.llm_device, args.tiny, lambda name, s, mb: add(name, s, mb), measure)
        if args.stream_gb:
            streaming_rows(args.stream_gb, lambda name, s, mb: add(name, s, mb), args.tiny)
    print_table(rows)


if __name__ == "__main__":
    main()
