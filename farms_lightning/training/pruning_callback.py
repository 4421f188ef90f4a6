"""``FARMSModelPruning``: Lightning's ``ModelPruning`` with AlphaPruning's per-layer amounts.

Kept apart from :mod:`farms_lightning.policies.pruners` so that the pruners (and the CLI) do not import
Lightning.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from lightning.pytorch.callbacks import ModelPruning
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.utils import prune as torch_prune

from farms_lightning.engine.analysis import analyze_layers, resolve_settings
from farms_lightning.models.layers import LayerMatrix, discover_layers, renamed_layers, validate_discovery_args
from farms_lightning.policies.pruners import parameter_owners, smallest
from farms_lightning.policies.pruning import alpha_sparsity


class FARMSModelPruning(ModelPruning):
    r"""Lightning ``ModelPruning`` with AlphaPruning's per-layer amounts, by magnitude.

    At every pruning epoch (Lightning's schedule: ``apply_pruning``, ``prune_on_train_epoch_end``)
    ``amount`` is the target *mean* sparsity ``S`` of the selected layers, cumulative (not the
    fraction of the remaining weights, as in ``ModelPruning``); a callable gets the epoch. The
    layers' alphas are computed once, from the dense weights at the first pruning, and give
    per-layer sparsities with :func:`~farms_lightning.policies.pruning.alpha_sparsity`; each layer then
    keeps its earlier mask and loses its smallest-magnitude remaining weights up to exactly
    ``round(sparsity * numel)`` zeros in its mask (masks only grow: a lower ``S`` later prunes nothing
    back). Masks are PyTorch pruning masks (``weight_orig``/``weight_mask``), so the zeros stay zero
    while training; ``make_pruning_permanent`` folds them in at the end and in checkpoints.
    ``sparsities`` holds the last targets and ``alphas`` the alphas (saved in checkpoints).

    Args:
        amount: target mean sparsity ``S`` (float) or ``epoch -> S``.
        epsilon, blocks, max_sparsity: as for :func:`~farms_lightning.policies.pruning.alpha_sparsity`.
        preset, window, aspect_ratio, windows_per_dim, fit, esd, dtype, include, exclude, layer_types,
            min_eigenvalues, peak_bound, min_window_side: as for :func:`farms_lightning.analyze`, but the preset defaults
            to ``"llm"`` (AlphaPruning's peak fit). ``include``/``exclude``/``layer_types`` also choose
            the layers pruned (default: Linear, Conv, attention in-projections, Conv1D).
        apply_pruning, make_pruning_permanent, use_lottery_ticket_hypothesis, verbose,
            prune_on_train_epoch_end: as for Lightning's ``ModelPruning``.
        split_qkv: fused q/k/v projections are three pruning units (default) or one.

    Raises:
        ValueError: a bad number or engine option; in ``setup``, a selected layer that cannot be
            pruned in place (a PEFT LoRA layer: ``merge_and_unload()`` first; parametrized or
            quantized weights).

    Example::

        >>> pruning = FARMSModelPruning(amount=lambda epoch: [0.0, 0.3, 0.5][min(epoch, 2)], esd="farms")
        >>> Trainer(callbacks=[pruning]).fit(model)
        >>> pruning.sparsities  # {layer: sparsity}, parameter-weighted mean 0.5
    """

    def __init__(
        self,
        amount: Union[float, Callable[[int], float]] = 0.5,
        epsilon: float = 0.3,
        blocks: Optional[Union[str, list[str]]] = None,
        max_sparsity: float = 0.99,
        preset: str = "llm",
        window: Optional[int] = None,
        aspect_ratio: Optional[float] = None,
        windows_per_dim: Optional[int] = None,
        fit: Optional[str] = None,
        esd: str = "farms",
        dtype: Optional[str] = None,
        include: Optional[Union[str, list[str]]] = None,
        exclude: Optional[Union[str, list[str]]] = None,
        layer_types: Optional[list[str]] = None,
        min_eigenvalues: int = 10,
        peak_bound: str = "reference",
        min_window_side: int = 16,
        apply_pruning: Union[bool, Callable[[int], bool]] = True,
        make_pruning_permanent: bool = True,
        use_lottery_ticket_hypothesis: Union[bool, Callable[[int], bool]] = False,
        verbose: int = 0,
        prune_on_train_epoch_end: bool = True,
        split_qkv: bool = True,
    ) -> None:
        super().__init__("l1_unstructured", parameter_names=["weight"], use_global_unstructured=False,
                         amount=amount, apply_pruning=apply_pruning, make_pruning_permanent=make_pruning_permanent,
                         use_lottery_ticket_hypothesis=use_lottery_ticket_hypothesis, verbose=verbose,
                         prune_on_train_epoch_end=prune_on_train_epoch_end)
        # Fail at construction, not epochs into training, on bad numbers or engine options.
        alpha_sparsity({}, 0.0 if callable(amount) else amount, epsilon, blocks=blocks, max_sparsity=max_sparsity)
        resolve_settings(preset, window, aspect_ratio, windows_per_dim, fit, esd, dtype, min_eigenvalues, peak_bound,
                         min_window_side=min_window_side)
        validate_discovery_args(split_qkv, "merged")
        self.split_qkv = split_qkv
        self.epsilon, self.blocks, self.max_sparsity = epsilon, blocks, max_sparsity
        self.analysis: dict[str, Any] = dict(preset=preset, window=window, aspect_ratio=aspect_ratio, windows_per_dim=windows_per_dim,
                             fit=fit, esd=esd, dtype=dtype, include=include, exclude=exclude, layer_types=layer_types,
                             min_eigenvalues=min_eigenvalues, peak_bound=peak_bound, min_window_side=min_window_side,
                             random_baseline=False)  # only the alphas set the sparsities
        self.alphas: dict[str, Optional[float]] = {}
        self.sparsities: dict[str, float] = {}
        self._targets: list[tuple[LayerMatrix, nn.Module, str]] = []
        self._module: Optional[nn.Module] = None

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if not self._targets:  # resolved once: after pruning, `weight` is no longer a parameter
            owners = parameter_owners(pl_module)
            layers = discover_layers(pl_module, self.analysis["layer_types"], self.analysis["include"],
                                     self.analysis["exclude"], split_qkv=self.split_qkv)
            refused = [error for layer in layers if (error := layer.write_error())]
            if refused:
                raise ValueError(f"FARMSModelPruning: {refused[0]}")
            self._targets = [(layer, *owners[id(layer.weight)]) for layer in layers if id(layer.weight) in owners]
            self._parameters_to_prune = list(dict.fromkeys((m, n) for _, m, n in self._targets))
        self._module = pl_module
        super().setup(trainer, pl_module, stage)  # type: ignore[arg-type]

    def apply_pruning(self, amount: Union[int, float]) -> None:
        """Prune every target layer to its share of the mean sparsity ``amount``."""
        prev = [self._get_pruned_stats(m, n) for m, n in self._parameters_to_prune] if self._verbose else []
        if not self.alphas:  # once, from the dense weights: zeros would change the spectra
            assert self._module is not None, "setup() runs before any pruning"
            a = self.analysis
            selection = ("include", "exclude", "layer_types")
            settings = resolve_settings(**{k: v for k, v in a.items() if k not in selection})
            layers = discover_layers(self._module, *(a[k] for k in ("layer_types", "include", "exclude")),
                                     split_qkv=self.split_qkv)
            # Only the alphas are used: the whole-matrix metrics (lambda_max, ...) would double the cost.
            stats = analyze_layers(layers, settings, whole_matrix=False)[0]
            self.alphas = {s.name: s.alpha for s in stats
                           if s is not None and not s.reason.startswith("shares weights")}
        counts = {layer.name: layer.num_params for layer, _, _ in self._targets}
        self._follow_renames(counts)
        self.sparsities = alpha_sparsity(self.alphas, float(amount), self.epsilon,
                                         param_counts={name: counts[name] for name in self.alphas},
                                         blocks=self.blocks, max_sparsity=self.max_sparsity)
        with torch.no_grad():
            for module, name in self._parameters_to_prune:
                weight = getattr(module, name + "_orig", getattr(module, name)).detach()
                old = getattr(module, name + "_mask", torch.ones_like(weight))
                drop = torch.zeros_like(weight, dtype=torch.bool)
                for layer, m, n in self._targets:
                    if m is module and n == name and layer.name in self.sparsities:
                        part_old, part_weight = layer.view_of(old), layer.view_of(weight)
                        # Pruned entries score -1, below every magnitude: they are chosen first.
                        scores = torch.where(part_old == 0, -1.0, part_weight.abs().to(torch.float64))
                        scores = scores.flatten(0, 1) if scores.dim() == 3 and layer.split is not None else scores
                        count = max(round(self.sparsities[layer.name] * scores.numel()), int((part_old == 0).sum()))
                        part_drop = layer.view_of(drop)
                        part_drop.copy_(smallest(scores, count).reshape(part_drop.shape))
                torch_prune.custom_from_mask(module, name, ~drop)
        if self._verbose:
            self._log_sparsity_stats(prev, [self._get_pruned_stats(m, n) for m, n in self._parameters_to_prune],
                                     amount=amount)

    def _follow_renames(self, counts: dict[str, int]) -> None:
        """Alphas restored from a checkpoint of an earlier version, under the names layers have now."""
        renamed = renamed_layers(self.alphas, counts)
        gone = [name for name in self.alphas if name not in counts and name not in renamed]
        if not renamed and not gone:
            return
        rank_zero_warn(f"FARMSModelPruning: the restored alphas name {len(renamed) + len(gone)} layer(s) as an "
                       f"earlier version did (fused q/k/v are now split, PEFT prefixes stripped); renamed: "
                       f"{dict(list(renamed.items())[:3])}, dropped: {gone[:3]}")
        alphas: dict[str, Optional[float]] = {}
        for name, alpha in self.alphas.items():
            for new in renamed.get(name, [name] if name in counts else []):
                alphas.setdefault(new, alpha)
        self.alphas = alphas

    def state_dict(self) -> dict[str, Any]:
        return {"alphas": dict(self.alphas), "sparsities": dict(self.sparsities)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alphas = dict(state_dict.get("alphas", {}))
        self.sparsities = dict(state_dict.get("sparsities", {}))

