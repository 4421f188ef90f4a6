"""``FARMSCallback``: FARMS heavy-tail statistics of the model during Lightning training."""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from farms_lightning.engine.analysis import resolve_settings
from farms_lightning.engine.distributed import analyze_distributed
from farms_lightning.engine.esd_metrics import METRIC_NAMES
from farms_lightning.engine.matrix_metrics import wants_matrix_metrics
from farms_lightning.engine.report import FARMSReport, uses_weightwatcher_labels
from farms_lightning.engine.warm_starts import validate_warm_starts
from farms_lightning.models.layers import discover_layers, renamed_layers, validate_discovery_args
from farms_lightning.reporting.history import (
    HISTORY_FORMATS,
    analysis_label,
    heatmap_metric,
    history_entry,
    history_path,
    layer_key,
    report_scalars,
    validate_history,
    validate_pending,
    write_history,
)
from farms_lightning.training import dashboard

#: Per-layer statistics of the random-matrix baseline (need ``random_baseline=True``).
BASELINE_METRICS = ("alpha_random", "alpha_random_spread", "alpha_delta")
#: Per-layer statistics that can be logged as scalars.
LOGGABLE_METRICS = ("alpha", "xmin", "D", "num_evals", *METRIC_NAMES, *BASELINE_METRICS)
UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLAFSDP")


class FARMSCallback(Callback):
    r"""Compute FARMS statistics of every weight matrix during training and log them.

    By default the model is analysed before training (``on_train_start``; not repeated on resume)
    and once per training epoch, from the weights the epoch ended with: at the start of the
    validation that ends the epoch (before any callback swaps averaged weights in, and before
    ``EarlyStopping``, ``ModelCheckpoint`` or Optuna's pruning callback read their monitor), or at
    ``on_train_epoch_end`` when no validation ends the epoch. Never in sanity checks. Per-layer
    scalars (``farms/alpha/<layer>``, ...) and the model summary (``farms/alpha_mean``, ...,
    ``farms/time_s``) go through ``pl_module.log`` on every rank, so they reach every logger and
    ``trainer.callback_metrics``. With the random-matrix baseline (the default) each layer logs
    ``alpha`` and ``alpha_delta`` (alpha minus the alpha of random matrices of its shape; below zero:
    a heavier tail than chance), and the summary holds ``alpha_delta_mean``, ``alpha_delta_median``
    and ``num_looks_random``. TensorBoard also gets one run per layer
    (``<log_dir>/<prefix>_by_layer/<layer>``), so every layer's line has its own colour and name,
    a custom-scalars layout (per-layer charts, the summary grouped by scale) and, whenever
    matplotlib is installed, the ``alpha_heatmap`` figure (layers x analyses of ``alpha_delta``).
    ``log_figures`` adds ESD and alpha-per-layer figures (figures also go to MLflow, W&B and
    Comet). Under DDP the layers are split across ranks and the results gathered (one collective).

    Args:
        preset, window, aspect_ratio, windows_per_dim, fit, esd, dtype, include, exclude,
            layer_types, min_eigenvalues, peak_bound, random_baseline, min_window_side: engine options, as for
            :func:`farms_lightning.analyze` (``dtype`` as a string: ``"float64"``).
            The random-matrix baseline is computed once per layer shape (cached), so only the
            first analysis pays for it.
        every_n_epochs: analyse at the end of every n-th training epoch (``None``/0: never).
        every_n_steps: also analyse after every n-th optimizer step (``None``: never).
        analyze_on_train_start: analyse the initial weights before the first step.
        log_metrics: per-layer statistics logged as scalars (among ``LOGGABLE_METRICS``). Default:
            ``("alpha", "alpha_delta")`` with the random baseline, ``("alpha",)`` without.
        log_summary: log the model summary scalars and ``time_s``.
        log_histogram: log a TensorBoard histogram of the layer alphas.
        log_heatmap: log the ``<prefix>/alpha_heatmap`` figure (``alpha_delta``, else ``alpha``, of
            every layer over the analyses so far) to every logger that takes images. Default
            (``None``): whenever matplotlib is installed. It needs only the history.
        log_figures: also log the ESD and alpha-per-layer figures (needs matplotlib; keeps every
            layer's eigenvalues and analyses frozen layers again each time).
        print_summary: print the last analysis as a table at the end of fit (rank zero).
        save_history: also write the history as ``"json"`` or ``"csv"`` into the log dir
            (``<prefix>_history.<format>``).
        prefix: the first component of every logged key, and the TensorBoard layout category; two
            callbacks with different prefixes (e.g. different presets) can run side by side.
        split_qkv, lora: how fused q/k/v projections and PEFT LoRA layers are analysed, as for
            :func:`farms_lightning.analyze`.
        matrix_metrics: compute the whole-matrix metrics (``lambda_max``, ``log_spectral_norm``,
            ``norm``, ``log_norm``, ``stable_rank``, ``alpha_weighted`` and the summary's
            ``alpha_weighted_mean``): ``True`` always, ``False`` never, ``None`` (default) when
            ``log_metrics`` logs one of them. They cost about two thirds of an analysis of
            random-init weights; left out, rows hold ``None`` for them and ``alpha_weighted_mean`` is
            NaN, never logged. Each ``lambda_max`` starts from the vector the previous analysis
            found (kept in the checkpointed state, so a resumed run gives the same bits).

    Raises:
        ValueError: a bad engine option or argument, or a baseline metric in ``log_metrics`` with
            ``random_baseline=False``.
        MisconfigurationException: in ``setup``, a sharded strategy (FSDP, DeepSpeed) whose ranks
            do not hold full weights, or ``log_figures``/``log_heatmap=True`` without matplotlib.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> farms = FARMSCallback()
        >>> trainer = Trainer(max_epochs=5, callbacks=[farms])
        >>> # after trainer.fit(...): trainer.callback_metrics["farms/alpha_delta_mean"],
        >>> # farms.history[-1]["summary"], farms.last_report.to_table()
    """

    def __init__(
        self,
        preset: str = "cv",
        window: Optional[int] = None,
        aspect_ratio: Optional[float] = None,
        windows_per_dim: Optional[int] = None,
        fit: Optional[str] = None,
        esd: str = "farms",
        dtype: Optional[str] = None,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        layer_types: Optional[list[str]] = None,
        min_eigenvalues: int = 10,
        peak_bound: str = "reference",
        random_baseline: bool = True,
        min_window_side: int = 16,
        every_n_epochs: Optional[int] = 1,
        every_n_steps: Optional[int] = None,
        analyze_on_train_start: bool = True,
        log_metrics: Optional[Sequence[str]] = None,
        log_summary: bool = True,
        log_histogram: bool = False,
        log_heatmap: Optional[bool] = None,
        log_figures: bool = False,
        print_summary: bool = True,
        save_history: Optional[str] = None,
        prefix: str = "farms",
        split_qkv: bool = True,
        lora: str = "merged",
        matrix_metrics: Optional[bool] = None,
    ) -> None:
        self.settings = resolve_settings(preset, window, aspect_ratio, windows_per_dim, fit, esd, dtype,
                                         min_eigenvalues, peak_bound, random_baseline, min_window_side)
        self.include, self.exclude, self.layer_types = include, exclude, layer_types
        validate_discovery_args(split_qkv, lora)
        self.split_qkv, self.lora = split_qkv, lora
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"`{name}` must be None or an integer >= 0, got {value!r}")
        if log_metrics is None:
            log_metrics = ("alpha", "alpha_delta") if random_baseline else ("alpha",)
        elif isinstance(log_metrics, str):
            raise ValueError(f"`log_metrics` must be a sequence of metric names, got the string {log_metrics!r}")
        unknown = [m for m in log_metrics if m not in LOGGABLE_METRICS]
        if unknown:
            raise ValueError(f"`log_metrics` entries must be among {LOGGABLE_METRICS}, got {unknown}")
        needs_baseline = [m for m in log_metrics if m in BASELINE_METRICS]
        if needs_baseline and not random_baseline:
            raise ValueError(f"`log_metrics` entries {needs_baseline} need `random_baseline=True`")
        if save_history not in (None, *HISTORY_FORMATS):
            raise ValueError(f"`save_history` must be None or one of {HISTORY_FORMATS}, got {save_history!r}")
        self.every_n_epochs = every_n_epochs or 0
        self.every_n_steps = every_n_steps or 0
        self.analyze_on_train_start = analyze_on_train_start
        self.log_metrics = tuple(log_metrics)
        self.matrix_metrics = wants_matrix_metrics(matrix_metrics, self.log_metrics)
        # Layer name -> the top singular vectors the last analysis found: the next lambda_max starts there.
        self._warm_starts: dict[str, list[torch.Tensor]] = {}
        self.log_summary, self.log_histogram, self.log_figures = log_summary, log_histogram, log_figures
        self.log_heatmap = log_heatmap
        self.print_summary, self.save_history, self.prefix = print_summary, save_history, prefix
        #: Every analysis: ``{"stage", "epoch", "step", "time_s", "summary", "layers": [rows]}``.
        self.history: list[dict[str, Any]] = []
        self.last_report: FARMSReport | None = None
        self._pending: dict[str, int] | None = None
        self._warned: set[tuple[str, str]] = set()
        self._trainer: pl.Trainer | None = None
        # Frozen layers whose weights did not change since the last analysis are not analysed again.
        self._frozen_cache: dict[tuple, Any] = {}
        self._heatmap = bool(log_heatmap)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**{k: self.settings[k] for k in ("preset", "esd", "fit", "window")},
                                        prefix=self.prefix)

    # ----------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in UNSUPPORTED_STRATEGIES):
            raise MisconfigurationException(
                f"FARMSCallback needs every rank to hold full weights; {strategy} shards them. Use DDP, or "
                "analyse a saved checkpoint with `farms_lightning.analyze`."
            )
        has_matplotlib = importlib.util.find_spec("matplotlib") is not None
        for option in ("log_figures", "log_heatmap"):
            if getattr(self, option) and not has_matplotlib:
                raise MisconfigurationException(
                    f"FARMSCallback({option}=True) needs matplotlib: pip install -e '.[plot]' in the checkout"
                )
        self._heatmap = has_matplotlib if self.log_heatmap is None else self.log_heatmap
        if stage == "fit" and not trainer.loggers:
            rank_zero_warn("FARMSCallback: no logger configured; statistics are kept in `callback.history` "
                           "and `trainer.callback_metrics`.")
        self._trainer = trainer

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.history:
            self._check_history_names(pl_module)
        if self._pending is not None:  # resumed from a checkpoint saved before that epoch's analysis
            pending, self._pending = self._pending, None
            self._run(trainer, pl_module, "epoch", pending["epoch"], pending["step"], log_now=True)
        elif self.analyze_on_train_start and trainer.global_step == 0 and not self.history:
            self._run(trainer, pl_module, "train_start", trainer.current_epoch, 0, log_now=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and self._last_step("step") != step:
            self._run(trainer, pl_module, "step", trainer.current_epoch, step, log_now=False, on_step=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The validation that ends a due epoch: analyse now, so that monitors reading `callback_metrics`
        # in this validation (EarlyStopping, ModelCheckpoint, Optuna pruning) get this epoch's value,
        # and before `on_validation_epoch_start`, where weight-averaging callbacks swap weights in.
        if self._epoch_training_done(trainer):
            with torch.inference_mode(False):  # the analysis is the same as outside validation
                self._run(trainer, pl_module, "epoch", trainer.current_epoch, trainer.global_step, log_now=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch  # no validation ended this epoch (or it had no due analysis)
        if self._epoch_due(epoch) and not self._analysed_epoch(epoch):
            self._run(trainer, pl_module, "epoch", epoch, trainer.global_step, log_now=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.print_summary and self.last_report is not None:
            rank_zero_info(f"FARMS analysis ({analysis_label(self.history[-1], long=True)}):\n"
                           f"{self.last_report.to_table()}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.global_rank == 0:  # only rank zero writes the per-layer runs
            for logger in trainer.loggers:
                if dashboard.is_tensorboard(logger):
                    dashboard.close_layer_runs(logger.experiment)  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        pending = self._pending
        trainer = self._trainer
        if pending is None and trainer is not None and self._epoch_training_done(trainer):
            # A checkpoint saved during the validation that ends an epoch before this callback's
            # on_validation_start analysed it (e.g. by a callback's own on_validation_start): remember
            # the due analysis so that a resumed run makes it first, from the same weights.
            pending = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        return {"history": self.history, "pending": pending, "warm_starts": dict(self._warm_starts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history, a pending analysis and the warm starts from a checkpoint, validated first.

        Raises:
            ValueError: a state that is not this callback's (not a dict, no ``history``), a history
                of a wrong form (:func:`~farms_lightning.reporting.history.validate_history`), a
                pending analysis whose epoch or step is not an integer >= 0, or warm starts of a
                wrong form (:func:`~farms_lightning.engine.warm_starts.validate_warm_starts`; a
                checkpoint without them starts cold). Nothing is restored then.
        """
        what = f"{type(self).__name__} state in the checkpoint"
        if not isinstance(state_dict, dict) or "history" not in state_dict:
            found = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"{what} is not this callback's: expected a dict with 'history', got {found}")
        history = validate_history(state_dict["history"], f"{what}: history")
        pending = validate_pending(state_dict.get("pending"), f"{what}: pending analysis")
        self._warm_starts = validate_warm_starts(state_dict.get("warm_starts", {}), f"{what}: warm_starts")
        self.history, self._pending = history, pending

    def _check_history_names(self, pl_module: pl.LightningModule) -> None:
        """Say once when a restored history names layers as an earlier version did."""
        current = {layer.name for layer in discover_layers(pl_module, self.layer_types, self.include, self.exclude,
                                                           split_qkv=self.split_qkv, lora=self.lora)}
        renamed = renamed_layers([row["name"] for row in self.history[-1].get("layers", [])], current)
        if renamed:
            examples = "; ".join(f"{old} -> {', '.join(new)}" for old, new in list(renamed.items())[:3])
            rank_zero_warn(f"FARMSCallback: the restored history names {len(renamed)} layer(s) as an earlier version "
                           f"did (fused q/k/v are now split, PEFT prefixes stripped): {examples}. Its entries are "
                           "kept as they were; new analyses use the new names.")

    # ----------------------------------------------------------------- analysis and logging
    def _epoch_due(self, epoch: int) -> bool:
        return bool(self.every_n_epochs) and (epoch + 1) % self.every_n_epochs == 0

    def _last_step(self, stage: str) -> int | None:
        return next((h["step"] for h in reversed(self.history) if h["stage"] == stage), None)

    def _analysed_epoch(self, epoch: int) -> bool:
        return any(h["stage"] == "epoch" and h["epoch"] == epoch for h in self.history)

    def _epoch_training_done(self, trainer: pl.Trainer) -> bool:
        """In the validation that ends a training epoch whose due analysis is not made yet."""
        if not trainer.validating or trainer.sanity_checking or trainer.state.fn != "fit":
            return False
        epoch = trainer.current_epoch
        progress = trainer.fit_loop.epoch_loop.batch_progress
        finished = progress.is_last_batch or progress.current.ready >= trainer.num_training_batches
        return finished and self._epoch_due(epoch) and not self._analysed_epoch(epoch)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, epoch: int, step: int,
             log_now: bool, on_step: bool = False) -> None:
        report, elapsed = analyze_distributed(
            pl_module, self.settings, self.include, self.exclude, self.layer_types, keep_eigenvalues=self.log_figures,
            frozen_cache=None if self.log_figures else self._frozen_cache, split_qkv=self.split_qkv, lora=self.lora,
            whole_matrix=self.matrix_metrics, warm_starts=self._warm_starts if self.matrix_metrics else None)
        self.last_report = report
        entry = history_entry(report, stage, epoch, step, elapsed)
        self.history.append(entry)
        self._warn_bad_layers(report)
        self._on_report(trainer, pl_module, report, entry)
        scalars = self._scalars(report, elapsed)
        # Lightning logs epoch-end values at the epoch's last step index (global_step - 1).
        logger_step = max(0, step - 1) if stage == "epoch" else step
        if log_now:  # hooks where self.log cannot log now: straight to the loggers and callback_metrics
            for logger in trainer.loggers:  # with the epoch, as Lightning's own logging adds it
                logger.log_metrics({**scalars, "epoch": epoch}, step=logger_step)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars.items()})
        else:
            for key, value in scalars.items():
                pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, batch_size=1, sync_dist=False)
        # `trainer.log_dir` is a collective (a broadcast): every rank must ask, not only rank zero.
        folder = (trainer.log_dir or trainer.default_root_dir) if self.save_history else None
        self._log_rank_zero(trainer, report, logger_step, folder)

    def _on_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: FARMSReport,
                   entry: dict[str, Any]) -> None:
        """Subclasses act on a new analysis here (before its scalars are logged)."""

    def _scalars(self, report: FARMSReport, elapsed: float) -> dict[str, float]:
        return report_scalars(report, self.prefix, self.log_metrics, self.log_summary, elapsed)

    def _by_layer_values(self, report: FARMSReport) -> dict[str, dict[str, float]]:
        """Per-layer metric -> layer -> value, for the per-layer runs (subclasses add their own)."""
        return {metric: {layer_key(s.name): float(getattr(s, metric)) for s in report.layers
                         if s.status == "ok" and getattr(s, metric) is not None} for metric in self.log_metrics}

    def _extra_charts(self) -> dict[str, list[str]]:
        """Further custom-scalars charts (title -> tags) of a subclass."""
        return {}

    def _charted_metrics(self) -> list[str]:
        """Per-layer metrics with a chart: those logged and fitted in some analysis so far."""
        rows = [row for entry in self.history for row in entry["layers"] if row["status"] == "ok"]
        return [m for m in self.log_metrics if any(row.get(m) is not None for row in rows)]

    def _warn_bad_layers(self, report: FARMSReport) -> None:
        for stats in report.layers:
            key = (stats.name, stats.reason)
            # A layer too small to judge (a classification head) is normal: its row says so, no warning.
            if stats.status not in ("ok", "too_small") and key not in self._warned:
                self._warned.add(key)
                rank_zero_warn(f"FARMSCallback: layer {stats.name!r} {stats.status}: {stats.reason}")

    @rank_zero_only
    def _log_rank_zero(self, trainer: pl.Trainer, report: FARMSReport, step: int, folder: str | None) -> None:
        if folder is not None:
            write_history(self.history, history_path(folder, self.prefix, str(self.save_history)))
        alphas = report.alphas
        # Only logged values are charted: NaN ("not assessed") summary values are never logged.
        summary_keys = [k for k, v in report.summary.items() if not (isinstance(v, float) and math.isnan(v))] \
            if self.log_summary else []
        by_layer = self._by_layer_values(report)
        charted = dict.fromkeys([*self._charted_metrics(), *(m for m, values in by_layer.items() if values)])
        charts = {**dashboard.layout_charts(self.prefix, charted, summary_keys, self.log_summary),
                  **self._extra_charts()}
        for logger in trainer.loggers:
            if not dashboard.is_tensorboard(logger):
                continue
            writer = logger.experiment  # type: ignore[attr-defined]  # a TensorBoardLogger's SummaryWriter
            dashboard.add_layout(writer, self.prefix, charts)
            dashboard.write_layer_runs(writer, self.prefix, by_layer, step)
            if self.log_histogram and alphas:
                writer.add_histogram(f"{self.prefix}/alpha_histogram", torch.tensor(list(alphas.values())), step)
        if not any(dashboard.takes_images(lg) for lg in trainer.loggers):
            return
        from farms_lightning.reporting.plotting import plot_alphas, plot_esds, plot_history

        if self.log_figures and alphas:
            dashboard.log_figure(trainer.loggers, f"{self.prefix}/esd", plot_esds(report), step)
            figure = plot_alphas(report, weightwatcher_band=uses_weightwatcher_labels(self.settings))[0]
            dashboard.log_figure(trainer.loggers, f"{self.prefix}/alpha_per_layer", figure, step)
        if (self._heatmap or self.log_figures) and any(h["layers"] for h in self.history):
            heatmap = plot_history(self.history, heatmap_metric(self.history))[0]
            dashboard.log_figure(trainer.loggers, f"{self.prefix}/alpha_heatmap", heatmap, step)
