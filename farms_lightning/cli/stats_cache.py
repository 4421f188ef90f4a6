"""``--cache DIR``: each tensor's statistics on disk, keyed by its content, the settings and the version.

An interrupted analysis resumes where it stopped, and ``prune`` after ``analyze`` (same settings)
reuses the alphas instead of recomputing them. A key is the SHA-256 of the package version, the
analysis settings, the analysis device's kind, the layer's kind, dtype and shape, and the tensor's
bytes: a changed weight, setting or release never reuses an old entry. Entries are small JSON files
written atomically as each group of tensors is analysed (the cache is an output: the data-safety
rules apply, and a failed write is exit 5). An entry that cannot be read is recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from farms_lightning._version import __version__
from farms_lightning.engine.report import LayerStats
from farms_lightning.files.safe_io import (
    EXIT_OUTPUT,
    EXIT_USAGE,
    CLIError,
    output_errors,
    refuse_over_inputs,
    shown,
    write_text,
)
from farms_lightning.models.layers import LayerMatrix

#: Part of every key: raise it when a change alters the statistics without a new release.
CACHE_FORMAT = 2  # 2: layers too small to judge have their own status
#: Failures that depend on the run (memory, device), not on the weights: never cached.
TRANSIENT = ("analysis error", "eigenvalue error")


class StatsCache:
    """A folder of per-tensor statistics; ``hits`` and ``stored`` count this run's use of it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.hits = 0
        self.stored = 0

    @classmethod
    def open(cls, folder: Path, inputs: Sequence[Path], reads: Sequence[Path]) -> StatsCache:
        """Check (never inside or over an input: exit 2) and create the folder (exit 5 if it cannot be)."""
        refuse_over_inputs(folder, inputs, reads, folder=True)
        with output_errors(folder):
            if os.path.lexists(folder) and not os.path.isdir(folder):
                raise CLIError(f"--cache {shown(folder)} exists and is not a folder", EXIT_USAGE, help_hint=False)
            if not os.path.isdir(os.path.dirname(os.path.realpath(folder))):
                raise CLIError(f"cannot write {shown(folder)}: the folder {shown(folder.parent)} does not exist",
                               EXIT_OUTPUT)
            os.makedirs(folder, exist_ok=True)
        return cls(folder)

    def key(self, layer: LayerMatrix, tensor: torch.Tensor, settings: dict[str, Any], device: torch.device) -> str:

        digest = hashlib.sha256()
        # The random baseline does not change a layer's own statistics: entries with one serve runs
        # without one (``get`` asks for it when a run needs it).
        own = {k: v for k, v in settings.items() if k != "random_baseline"}
        described = {"version": __version__, "format": CACHE_FORMAT, "settings": own, "device": device.type, "kind": layer.kind, "split": layer.split,
                     "type": layer.module_type, "dtype": str(tensor.dtype), "shape": list(tensor.shape)}
        digest.update(json.dumps(described, sort_keys=True, default=str).encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().data)
        return digest.hexdigest()

    def get(self, key: str, name: str, needs_baseline: bool = False) -> LayerStats | None:
        """The cached statistics, or ``None``; a fitted entry without a baseline misses when one is needed."""
        try:
            data = json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
            stats = LayerStats(**{**data, "name": name, "shape": tuple(data["shape"])})
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if needs_baseline and stats.status == "ok" and stats.alpha_random is None:
            return None
        self.hits += 1
        return stats

    def put(self, key: str, stats: LayerStats) -> None:
        if stats.status == "failed" and stats.reason.startswith(TRANSIENT):
            return
        data = dataclasses.asdict(stats)
        del data["name"]  # tied copies and renamed checkpoints reuse the entry under their own name
        write_text(self.folder / f"{key}.json", json.dumps(data))
        self.stored += 1
