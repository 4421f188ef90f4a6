"""Peak memory of a streaming ``farms-lightning analyze`` of one LLaMA 4096x4096 matrix, cv vs llm preset.

    python benchmarks/llm_stream_memory.py      # 4-7 min on 2 cores (the llm run)

The ``--max-memory`` estimate counts the solver's batches as at most 3 x 32 MiB per thread, and a
2000x2000 window of the ``llm`` preset is a batch on its own. The command line has glibc give freed
blocks of 4 MiB or more back at once (``streaming.return_large_blocks_when_freed``); without that,
glibc kept freed windows for reuse and the ``llm`` run peaked far higher. This prints the peak RSS
and peak ``RssAnon`` of both presets on the same one-matrix checkpoint (random baseline off), so the
difference is the ``llm`` preset's own working set.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser.parse_args()


def main() -> None:
    parse_args()  # no options: --help prints this docstring (before the heavy imports) instead of running
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_llm import generate_checkpoint, peak_memory

    with tempfile.TemporaryDirectory(prefix="farms-llm-memory-") as tmp:
        folder = Path(tmp) / "one-matrix"
        folder.mkdir()
        generate_checkpoint(folder, 1, (4096, 4096))
        for preset in ("cv", "llm"):
            seconds, rss, anon = peak_memory(["analyze", str(folder), "--preset", preset, "--device", "cpu",
                                              "--no-random-baseline", "--format", "json",
                                              "-o", str(Path(tmp) / f"{preset}.json")])
            print(f"{preset} preset: {seconds:.1f} s, peak RSS {rss / 2**20:.0f} MiB, "
                  f"peak RssAnon {anon / 2**20:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
