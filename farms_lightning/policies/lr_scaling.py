"""Scale each param group's learning rate for the optimizer step only, and restore it afterwards.

Schedulers (closed-form or chainable, ReduceLROnPlateau), checkpoints and ``LearningRateMonitor``
only ever see the user's own learning rates: a step pre-hook multiplies ``group["lr"]`` by the
group's factor and the post-hook writes the saved value back (an assignment, not a division, so
the user's LR is restored bit for bit).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.hooks import RemovableHandle


class ParamGroupLRScaler:
    """Per-param-group LR factors applied through optimizer step hooks.

    A group's factor is the parameter-weighted mean of its parameters' factors (parameters without
    a factor count as 1), so a group holding exactly one layer gets that layer's factor.
    """

    def __init__(self, on_mixed_group: Callable[[int, int], None] | None = None) -> None:
        self.optimizers: list[torch.optim.Optimizer] = []
        self.group_factors: list[list[float]] = []
        self._saved: dict[tuple[int, int], Any] = {}
        self._handles: list[RemovableHandle] = []
        self._on_mixed_group = on_mixed_group

    def attach(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.detach()
        self.optimizers = list(optimizers)
        self.group_factors = [[1.0] * len(opt.param_groups) for opt in self.optimizers]
        for index, optimizer in enumerate(self.optimizers):
            self._handles.append(optimizer.register_step_pre_hook(self._pre_hook(index)))
            self._handles.append(optimizer.register_step_post_hook(self._post_hook(index)))

    def detach(self) -> None:
        self._restore_all()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def set_parameter_factors(self, factors: dict[int, float]) -> None:
        """Group factors from factors keyed by parameter ``id`` (groups added since are included)."""
        for index, optimizer in enumerate(self.optimizers):
            self.group_factors[index] = [1.0] * len(optimizer.param_groups)
            for g, group in enumerate(optimizer.param_groups):
                sizes = [(p.numel(), factors.get(id(p), 1.0)) for p in group["params"]]
                total = sum(n for n, _ in sizes)
                distinct = {f for _, f in sizes}
                if len(distinct) > 1 and self._on_mixed_group is not None:
                    self._on_mixed_group(index, g)
                factor = sum(n * f for n, f in sizes) / total if total else 1.0
                self.group_factors[index][g] = distinct.pop() if len(distinct) == 1 else factor

    def _pre_hook(self, index: int) -> Callable[..., None]:
        def scale(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._restore(index)  # a step that raised never ran its post-hook
            for g, group in enumerate(optimizer.param_groups):
                factor = self.group_factors[index][g] if g < len(self.group_factors[index]) else 1.0
                if factor != 1.0:
                    self._saved[(index, g)] = group["lr"]
                    group["lr"] = group["lr"] * factor

        return scale

    def _post_hook(self, index: int) -> Callable[..., None]:
        def restore(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._restore(index)

        return restore

    def _restore(self, index: int) -> None:
        optimizer = self.optimizers[index]
        for (i, g), lr in list(self._saved.items()):
            if i == index:
                optimizer.param_groups[g]["lr"] = lr
                del self._saved[(i, g)]

    def _restore_all(self) -> None:
        for index in range(len(self.optimizers)):
            self._restore(index)

    def effective_lrs(self) -> list[list[float]]:
        """The LR each group uses in its next step: factor x the group's scheduled LR."""
        return [[float(group["lr"]) * self.group_factors[i][g] for g, group in enumerate(opt.param_groups)]
                for i, opt in enumerate(self.optimizers)]
