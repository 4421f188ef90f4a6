"""``FARMSLRBalancer``: TempBalance layer-wise learning rates from FARMS alphas, during training."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from farms_lightning.engine.report import FARMSReport
from farms_lightning.models.layers import renamed_layers
from farms_lightning.policies.lr_scaling import ParamGroupLRScaler
from farms_lightning.policies.tempbalance import layer_parameters, parameter_factors, validate_mapping_args
from farms_lightning.reporting.history import layer_key, validate_factors
from farms_lightning.training.callback import FARMSCallback


class FARMSLRBalancer(FARMSCallback):
    r"""A :class:`FARMSCallback` that also sets layer-wise learning rates from the alphas (TempBalance).

    After every analysis the tuned layers (fitted Linear/Conv/attention layers minus the first and
    the last) get factors from their alphas (``tb_linear_map``: higher alpha -> larger LR, from
    ``lr_min_ratio`` to ``lr_max_ratio``); each optimizer step uses ``factor x`` the LR the user's
    own schedule gives, through step pre/post hooks that scale ``group["lr"]`` and restore it, so
    schedulers, checkpoints and ``LearningRateMonitor`` keep seeing the user's LRs. Parameters are
    found by identity in the configured optimizers; a param group holding several layers with
    different factors uses their parameter-weighted mean (warned once):
    :func:`~farms_lightning.farms_param_groups` builds one group per layer. A layer without a fit
    keeps factor 1. Factors are part of the checkpointed state, so a resumed run uses the same LRs.

    Args:
        lr_balance_method: ``"tb_linear_map"`` (default), ``"tb_sqrt"``, ``"tb_log2"`` or ``"tb_step"``.
        lr_min_ratio, lr_max_ratio: the factor range ``s1``, ``s2`` (TempBalance: 0.5, 1.5; FARMS
            with ResNet-18: 0.1, 1.9).
        remove_first_layer, remove_last_layer: leave the first/last fitted layer at factor 1.
        pair_norm_layers: a BatchNorm following a tuned layer (or named like it, ``bn`` for
            ``conv``) shares its factor.
        balance_start_epoch: no balancing before this epoch (warm-up).
        log_lr: log ``farms/lr/<layer>``, the effective LR of every tuned layer, at every step.
        kwargs: :class:`FARMSCallback` arguments (engine options, schedule, logging).

    Raises:
        ValueError: a bad argument.
        MisconfigurationException: in ``setup``, a strategy that shards or flattens parameters
            (FSDP, DeepSpeed).

    Example::

        >>> trainer = Trainer(callbacks=[FARMSLRBalancer(lr_min_ratio=0.1, lr_max_ratio=1.9)])
    """

    def __init__(
        self,
        lr_balance_method: str = "tb_linear_map",
        lr_min_ratio: float = 0.5,
        lr_max_ratio: float = 1.5,
        remove_first_layer: bool = True,
        remove_last_layer: bool = True,
        pair_norm_layers: bool = True,
        balance_start_epoch: int = 0,
        log_lr: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        validate_mapping_args(lr_balance_method, lr_min_ratio, lr_max_ratio)
        if isinstance(balance_start_epoch, bool) or not isinstance(balance_start_epoch, int) or balance_start_epoch < 0:
            raise ValueError(f"`balance_start_epoch` must be an integer >= 0, got {balance_start_epoch!r}")
        self.lr_balance_method, self.lr_min_ratio, self.lr_max_ratio = lr_balance_method, lr_min_ratio, lr_max_ratio
        self.remove_first_layer, self.remove_last_layer = remove_first_layer, remove_last_layer
        self.pair_norm_layers, self.balance_start_epoch, self.log_lr = pair_norm_layers, balance_start_epoch, log_lr
        #: The latest factors by tuned layer name (restored from checkpoints).
        self.lr_factors: dict[str, float] = {}
        self._param_factors: dict[int, float] = {}
        self._scaler = ParamGroupLRScaler(on_mixed_group=self._warn_mixed_group)
        self._layer_params: dict[str, list] = {}
        self._lr_positions: dict[str, tuple[int, int]] = {}

    @property
    def state_key(self) -> str:
        return "LRBalancer" + super().state_key

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layer_params = layer_parameters(pl_module, self.pair_norm_layers, layer_types=self.layer_types,
                                              include=self.include, exclude=self.exclude, split_qkv=self.split_qkv,
                                              lora=self.lora)
        self._scaler.attach(trainer.optimizers)
        self._follow_renames()
        self._param_factors = {id(p): f for name, f in self.lr_factors.items()
                               for p in self._layer_params.get(name, [])}
        super().on_train_start(trainer, pl_module)  # may analyse now: before training, or a resume's catch-up

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self.log_lr or not self._layer_params:
            return
        effective = self._scaler.effective_lrs()
        for name, (i, g) in self._lr_positions.items():
            pl_module.log(f"{self.prefix}/lr/{name}", effective[i][g], on_step=True, on_epoch=False, batch_size=1)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._scaler.detach()
        super().on_fit_end(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._scaler.detach()
        super().teardown(trainer, pl_module, stage)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "lr_factors": dict(self.lr_factors)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history, a pending analysis and the LR factors, validated first.

        Raises:
            ValueError: a state of a wrong form (see :meth:`FARMSCallback.load_state_dict`), or LR
                factors that are not finite numbers > 0 by layer name. Nothing is restored then.
        """
        factors = validate_factors(state_dict.get("lr_factors", {}) if isinstance(state_dict, dict) else {},
                                   f"{type(self).__name__} state in the checkpoint: lr_factors")
        super().load_state_dict(state_dict)
        self.lr_factors = factors

    def _follow_renames(self) -> None:
        """Factors restored from a checkpoint of an earlier version, under the names layers have now."""
        renamed = renamed_layers(self.lr_factors, self._layer_params)
        if not renamed:
            return
        self._warn_once("renamed", f"FARMSLRBalancer: the restored LR factors name {len(renamed)} layer(s) as an "
                                   f"earlier version did; they apply to the layers these became: "
                                   f"{dict(list(renamed.items())[:3])}")
        factors: dict[str, float] = {}
        for name, factor in self.lr_factors.items():
            for new in renamed.get(name, [name]):
                factors.setdefault(new, factor)
        self.lr_factors = factors

    def _on_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: FARMSReport,
                   entry: dict[str, Any]) -> None:
        if not self._layer_params:  # analysed before on_train_start attached (not expected)
            return
        self.lr_factors, self._param_factors = parameter_factors(
            report, self._layer_params, self.lr_balance_method, self.lr_min_ratio, self.lr_max_ratio,
            self.remove_first_layer, self.remove_last_layer)
        entry["lr_factors"] = dict(self.lr_factors)
        for stats in report.layers:
            if stats.status != "ok" and stats.name in self._layer_params:
                self._warn_once(stats.name, f"FARMSLRBalancer: layer {stats.name!r} has no alpha ({stats.reason}); "
                                            "its learning rate keeps factor 1")
        if entry["stage"] != "epoch":  # epoch-end factors take effect at the next epoch's start
            self._apply(trainer.current_epoch)

    def _apply(self, epoch: int) -> None:
        self._scaler.set_parameter_factors(self._param_factors if epoch >= self.balance_start_epoch else {})
        # Where each tuned layer's weight sits (optimizer, group), for the per-step LR logging.
        groups = {id(p): (i, g) for i, opt in enumerate(self._scaler.optimizers)
                  for g, group in enumerate(opt.param_groups) for p in group["params"]}
        params = {name: self._layer_params.get(name) for name in self.lr_factors}  # restored names may be gone
        self._lr_positions = {name: groups[id(ps[0])] for name, ps in params.items() if ps and id(ps[0]) in groups}

    def _scalars(self, report: FARMSReport, elapsed: float) -> dict[str, float]:
        scalars = super()._scalars(report, elapsed)
        scalars.update({f"{self.prefix}/lr_factor/{name}": f for name, f in self.lr_factors.items()})
        return scalars

    def _by_layer_values(self, report: FARMSReport) -> dict[str, dict[str, float]]:
        return {**super()._by_layer_values(report), "lr_factor": {layer_key(n): f for n, f in self.lr_factors.items()}}

    def _extra_charts(self) -> dict[str, list[str]]:
        # The per-step LRs live in the main run only (a run per layer and step would cost a write each).
        tuned = [f"{self.prefix}/lr/{layer_key(name)}" for name in self.lr_factors]
        return {"lr (tuned layers, per step)": tuned} if self.log_lr and tuned else {}

    def _warn_mixed_group(self, optimizer: int, group: int) -> None:
        self._warn_once(f"group {optimizer}/{group}",
                        f"FARMSLRBalancer: param group {group} of optimizer {optimizer} holds parameters with "
                        "different LR factors; it uses their parameter-weighted mean. Build one group per layer "
                        "with `farms_lightning.farms_param_groups(model)`.")

    def _warn_once(self, key: str, message: str) -> None:
        if (key, message) not in self._warned:
            self._warned.add((key, message))
            rank_zero_warn(message)
