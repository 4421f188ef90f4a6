"""``FARMSTrainerCallback``: FARMS statistics (and optional TempBalance) for Hugging Face ``Trainer``.

Needs ``transformers`` and ``accelerate`` (from the checkout: ``pip install -e ".[transformers]"``);
importing this module imports them, nothing else in farms_lightning does.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Optional, Sequence

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, PrinterCallback, ProgressCallback

from farms_lightning.engine.analysis import resolve_settings
from farms_lightning.engine.distributed import analyze_distributed
from farms_lightning.engine.matrix_metrics import wants_matrix_metrics
from farms_lightning.engine.report import FARMSReport
from farms_lightning.integrations.trainer_state import CallbackState, export_state, import_state, state_key
from farms_lightning.models.layers import validate_discovery_args
from farms_lightning.policies.lr_scaling import ParamGroupLRScaler
from farms_lightning.policies.tempbalance import layer_parameters, parameter_factors, validate_mapping_args
from farms_lightning.reporting.history import (
    HISTORY_FORMATS,
    history_entry,
    history_path,
    report_scalars,
    write_history,
)

#: Per-layer statistics that can be logged (the row keys of a numeric statistic).
_NON_METRICS = ("name", "type", "shape", "status", "reason", "num_params")


def _console_printer_types() -> tuple[type, ...]:
    """The Trainer's callbacks that print each log to the console (the notebook one when it can be imported)."""
    printers: tuple[type, ...] = (ProgressCallback, PrinterCallback)
    try:
        from transformers.utils.notebook import NotebookProgressCallback
    except ImportError:  # pragma: no cover - IPython missing
        return printers
    return (*printers, NotebookProgressCallback)


class _PerLayerConsoleFilter(TrainerCallback):
    """Sits just before the Trainer's console printer and takes the per-layer keys out of the ``logs`` it
    prints. The loggers before it have seen them and ``state.log_history`` holds them: the Trainer passes
    one ``logs`` dict down its callback list and printing is the last thing done with it."""

    def __init__(self) -> None:
        #: The keys to take out of the next log (set by :class:`FARMSTrainerCallback` for that log only).
        self.hide: set[str] = set()

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict[str, Any]] = None,
               **kwargs: Any) -> None:
        if logs is not None:
            for key in self.hide:
                logs.pop(key, None)
        self.hide = set()


class FARMSTrainerCallback(TrainerCallback):
    r"""FARMS statistics of the model during ``transformers.Trainer`` training, in the Trainer's own logs.

    The model is analysed before training, after every ``every_n_steps``-th optimizer step and at
    the end of every ``every_n_epochs``-th epoch. The values (``farms/alpha/<layer>``,
    ``farms/alpha_mean``, ..., ``farms/time_s``, the keys :class:`~farms_lightning.FARMSCallback`
    logs) are held until the Trainer's next log and merged into it: into the ``logs`` that every
    ``report_to`` integration receives and into ``trainer.state.log_history[-1]``, so no
    loss/learning-rate/grad-norm entry is replaced or dropped. If several analyses happen between two
    logs, the log gets the latest values; every analysis is in :attr:`history`.

    The line the Trainer prints for each log (its progress bar or ``PrinterCallback``) carries the
    summary values only, not one value per layer, unless ``print_layers=True``: a small filter callback
    placed just before the printer takes the per-layer keys out of the ``logs`` dict after every
    logger before it has received them. A callback you add after the printer sees the summary only.

    Integrations only see the values if this callback's ``on_log`` runs before theirs, and the
    Trainer puts ``report_to`` callbacks before user callbacks. So when the Trainer calls
    ``on_init_end`` or ``on_train_begin``, the callback moves itself to the front of
    ``trainer.callback_handler.callbacks`` (with a warning if it cannot find that list; then do it
    yourself: ``trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(farms))``).

    With ``lr_balance=True`` it also applies TempBalance learning-rate factors after each analysis,
    exactly as :class:`~farms_lightning.FARMSLRBalancer`: step pre/post hooks on the optimizer scale
    each param group's LR for the step and restore it, so the Trainer's scheduler and its logged
    ``learning_rate`` keep the user's values. The Trainer's default optimizer has two param groups
    (with and without weight decay), each holding many layers, so every layer would get the same
    mean factor (warned once): pass one group per layer,
    ``Trainer(..., optimizers=(torch.optim.AdamW(farms_param_groups(model, lr=...)), None))``.

    Args:
        preset: ``"cv"`` or ``"llm"``.
        every_n_steps: analyse after every n-th optimizer step (``None``: never).
        every_n_epochs: analyse at the end of every n-th epoch (``None``/0: never).
        analyze_on_train_start: analyse the initial weights (not on a resumed run: ``global_step > 0``).
        log_metrics: per-layer statistics merged into the logs (row keys such as ``"alpha"``,
            ``"stable_rank"``).
        log_summary: merge the model summary values and ``time_s``.
        print_layers: also print the per-layer values (``farms/alpha/<layer>``, ``farms/lr_factor/<layer>``)
            in the Trainer's console line; by default it shows the summary only. The loggers and
            ``state.log_history`` receive the per-layer values either way.
        save_history: also write the history as ``"json"`` or ``"csv"`` into ``args.output_dir``
            (``<prefix>_history.<format>``, main process only).
        prefix: the first component of every key.
        include, exclude, layer_types, split_qkv, lora: layer selection, as for
            :func:`farms_lightning.analyze` (a PEFT LoRA model: its layers by their own names, the
            effective weights, TempBalance on the adapters).
        lr_balance: apply TempBalance factors (``lr_balance_method``, ``lr_min_ratio``,
            ``lr_max_ratio``, ``remove_first_layer``, ``remove_last_layer``, ``pair_norm_layers``
            as for :class:`~farms_lightning.FARMSLRBalancer`); factors are logged as
            ``farms/lr_factor/<layer>``.
        matrix_metrics: compute the whole-matrix metrics (``lambda_max``, ``stable_rank``, ...,
            ``alpha_weighted`` and the summary's ``alpha_weighted_mean``): ``True`` always, ``False``
            never, ``None`` (default) when ``log_metrics`` names one of them. Left out, rows hold
            ``None`` for them and ``alpha_weighted_mean`` is NaN, never logged. Each
            ``lambda_max`` starts from the vector the previous analysis found, kept in memory only
            (not in ``trainer_state.json``): a resumed run starts from the fixed start again, so its
            first ``lambda_max`` values agree to 1e-7, not to the bit.
        engine: other engine options of :func:`farms_lightning.analyze` (``window``,
            ``aspect_ratio``, ``windows_per_dim``, ``fit``, ``esd``, ``dtype`` as ``"float64"`` or
            ``"float32"``, ``min_eigenvalues``, ``peak_bound``, ...).

    Every checkpoint the Trainer saves holds this callback's state (history, LR factors, values not yet
    logged, analysis settings) in ``trainer_state.json``; ``trainer.train(resume_from_checkpoint=...)``
    restores it into this callback, its history rewound to the checkpoint's step
    (:mod:`~farms_lightning.integrations.trainer_state`).

    Raises:
        ValueError: a bad argument or engine option; in ``on_train_begin`` of a resumed run, a
            checkpointed state of a wrong form or made with other analysis settings.

    Example::

        >>> from transformers import Trainer
        >>> farms = FARMSTrainerCallback(preset="llm", every_n_steps=100)
        >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[farms])
        >>> trainer.train()
        >>> [h for h in trainer.state.log_history if "farms/alpha_mean" in h]  # per-layer values included
    """

    def __init__(
        self,
        preset: str = "cv",
        every_n_steps: Optional[int] = None,
        every_n_epochs: Optional[int] = 1,
        analyze_on_train_start: bool = True,
        log_metrics: Sequence[str] = ("alpha",),
        log_summary: bool = True,
        print_layers: bool = False,
        save_history: Optional[str] = None,
        prefix: str = "farms",
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        layer_types: Optional[list[str]] = None,
        lr_balance: bool = False,
        lr_balance_method: str = "tb_linear_map",
        lr_min_ratio: float = 0.5,
        lr_max_ratio: float = 1.5,
        remove_first_layer: bool = True,
        remove_last_layer: bool = True,
        pair_norm_layers: bool = True,
        split_qkv: bool = True,
        lora: str = "merged",
        matrix_metrics: Optional[bool] = None,
        **engine: Any,
    ) -> None:
        try:
            self.settings = resolve_settings(preset, **engine)
        except TypeError as error:  # an unknown keyword
            raise ValueError(f"FARMSTrainerCallback: unknown engine option ({error})") from None
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"`{name}` must be None or an integer >= 0, got {value!r}")
        from farms_lightning.engine.report import LayerStats

        known = [f for f in LayerStats.__dataclass_fields__ if f not in _NON_METRICS]
        unknown = [m for m in log_metrics if m not in known]
        if unknown:
            raise ValueError(f"`log_metrics` entries must be among {tuple(known)}, got {unknown}")
        if save_history not in (None, *HISTORY_FORMATS):
            raise ValueError(f"`save_history` must be None or one of {HISTORY_FORMATS}, got {save_history!r}")
        if lr_balance:
            validate_mapping_args(lr_balance_method, lr_min_ratio, lr_max_ratio)
        self.every_n_steps, self.every_n_epochs = every_n_steps or 0, every_n_epochs or 0
        self.analyze_on_train_start = analyze_on_train_start
        self.log_metrics, self.log_summary = tuple(log_metrics), log_summary
        self.matrix_metrics = wants_matrix_metrics(matrix_metrics, self.log_metrics)
        # Warm starts of lambda_max, in memory only: as vectors in the JSON trainer state they would
        # cost tens of MB per checkpoint at LLM scale.
        self._warm_starts: dict[str, list[torch.Tensor]] = {}
        self.print_layers = print_layers
        self.save_history, self.prefix = save_history, prefix
        self.include, self.exclude, self.layer_types = include, exclude, layer_types
        validate_discovery_args(split_qkv, lora)
        self.split_qkv, self.lora = split_qkv, lora
        self.lr_balance, self.lr_balance_method = lr_balance, lr_balance_method
        self.lr_min_ratio, self.lr_max_ratio = lr_min_ratio, lr_max_ratio
        self.remove_first_layer, self.remove_last_layer = remove_first_layer, remove_last_layer
        self.pair_norm_layers = pair_norm_layers
        #: Every analysis: ``{"stage", "epoch", "step", "time_s", "summary", "layers": [rows]}`` (and
        #: ``"lr_factors"`` with ``lr_balance``).
        self.history: list[dict[str, Any]] = []
        self.last_report: FARMSReport | None = None
        #: The latest TempBalance factors by layer name.
        self.lr_factors: dict[str, float] = {}
        self._pending: dict[str, float] = {}
        #: The pending keys that hold one layer's value each (kept off the console line).
        self._pending_per_layer: set[str] = set()
        self._console_filter = _PerLayerConsoleFilter()
        self._scaler = ParamGroupLRScaler(on_mixed_group=self._warn_mixed_group)
        self._layer_params: dict[str, list[torch.Tensor]] = {}
        self._warned: set[str] = set()
        self._frozen_cache: dict[tuple, Any] = {}

    # ----------------------------------------------------------------- Trainer events
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._move_first()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if not self._move_first():
            self._warn_once("first", "FARMSTrainerCallback could not move itself to the front of the Trainer's "
                                     "callbacks; report_to integrations before it will not see its values. Use "
                                     "trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(farms)).")
        if self.lr_balance:
            self._layer_params = layer_parameters(model, self.pair_norm_layers, layer_types=self.layer_types,
                                                  include=self.include, exclude=self.exclude,
                                                  split_qkv=self.split_qkv, lora=self.lora)
            # Accelerate wraps the optimizer; its step calls the torch optimizer's, where the hooks go.
            self._scaler.attach([getattr(optimizer, "optimizer", optimizer)])
        self._restore(args, state)
        if self.analyze_on_train_start and state.global_step == 0 and not self.history:
            self._run(args, state, model, "train_start", 0)
        self._publish(state)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._run(args, state, model, "step", self._epoch(state))

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        epoch = self._epoch(state)
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self._run(args, state, model, "epoch", epoch)

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict[str, Any]] = None,
               **kwargs: Any) -> None:
        if not self._pending or logs is None:
            return
        logs.update(self._pending)  # the dict every later callback (report_to integrations) receives
        if state.log_history:  # Trainer.log appended its copy before calling on_log
            state.log_history[-1].update(self._pending)
        if not self.print_layers and self._place_console_filter():
            self._console_filter.hide = set(self._pending_per_layer)
        self._pending, self._pending_per_layer = {}, set()
        self._publish(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._scaler.detach()

    # ----------------------------------------------------------------- analysis
    @staticmethod
    def _epoch(state: Any) -> int:
        """The index of the epoch in progress (``state.epoch`` is ``1.0`` at the end of the first)."""
        return max(0, math.ceil(state.epoch or 0.0) - 1)

    def _run(self, args: Any, state: Any, model: Any, stage: str, epoch: int) -> None:
        if model is None:
            return
        report, elapsed = analyze_distributed(model, self.settings, self.include, self.exclude, self.layer_types,
                                              frozen_cache=self._frozen_cache, split_qkv=self.split_qkv,
                                              lora=self.lora, whole_matrix=self.matrix_metrics,
                                              warm_starts=self._warm_starts if self.matrix_metrics else None)
        self.last_report = report
        entry = history_entry(report, stage, epoch, state.global_step, elapsed)
        for stats in report.layers:
            if stats.status not in ("ok", "too_small"):  # a too-small head is normal: its row says so
                self._warn_once(f"{stats.name}:{stats.reason}",
                                f"FARMSTrainerCallback: layer {stats.name!r} {stats.status}: {stats.reason}")
        scalars = report_scalars(report, self.prefix, self.log_metrics, self.log_summary, elapsed)
        per_layer = set(report_scalars(report, self.prefix, self.log_metrics, False, elapsed))
        if self.lr_balance and self._layer_params:
            self.lr_factors, param_factors = parameter_factors(
                report, self._layer_params, self.lr_balance_method, self.lr_min_ratio, self.lr_max_ratio,
                self.remove_first_layer, self.remove_last_layer)
            self._scaler.set_parameter_factors(param_factors)
            entry["lr_factors"] = dict(self.lr_factors)
            lr_factors = {f"{self.prefix}/lr_factor/{name}": f for name, f in self.lr_factors.items()}
            scalars.update(lr_factors)
            per_layer.update(lr_factors)
        self.history.append(entry)
        self._pending.update(scalars)
        self._pending_per_layer |= per_layer
        self._write_history(args, state)
        self._publish(state)

    # ----------------------------------------------------------------- checkpointed state
    def _restore(self, args: Any, state: Any) -> None:
        """On a resume, take the history, LR factors and pending values from the checkpoint's
        ``trainer_state.json`` (the Trainer loads it whatever ``restore_callback_states_from_checkpoint``
        says) into this very callback, and rewrite the history file as it was at the checkpoint."""
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(state_key(self.prefix))
        if saved is None:  # a fresh run, or a checkpoint of a version that saved no state
            return
        restored = import_state(saved, f"FARMSTrainerCallback state {state_key(self.prefix)!r} in the checkpoint",
                                self.settings, state.global_step)
        self.history, self._pending, self._pending_per_layer = restored.history, restored.pending, \
            restored.pending_per_layer
        self.lr_factors = restored.lr_factors if self.lr_balance else {}
        if self.lr_factors and self._layer_params:
            self._scaler.set_parameter_factors({id(p): f for name, f in self.lr_factors.items()
                                                for p in self._layer_params.get(name, [])})
        self._write_history(args, state)

    def _publish(self, state: Any) -> None:
        """Put the current state where the Trainer's next checkpoint saves it."""
        stored = getattr(state, "stateful_callbacks", None)
        if isinstance(stored, dict):
            stored[state_key(self.prefix)] = export_state(
                CallbackState(self.history, self.lr_factors, self._pending, self._pending_per_layer), self.settings)

    def _write_history(self, args: Any, state: Any) -> None:
        if self.save_history and state.is_world_process_zero:
            write_history(self.history, history_path(args.output_dir, self.prefix, self.save_history))

    # ----------------------------------------------------------------- helpers
    def _calling_handler(self) -> CallbackHandler | None:
        """The ``CallbackHandler`` calling this callback, found on the stack (the Trainer hands callbacks
        no reference to it)."""
        frame = inspect.currentframe()
        try:
            while frame is not None:
                handler = frame.f_locals.get("self")
                if isinstance(handler, CallbackHandler) and any(cb is self for cb in handler.callbacks):
                    return handler
                frame = frame.f_back
            return None
        finally:
            del frame

    def _move_first(self) -> bool:
        """Move this callback to the front of the calling ``CallbackHandler``'s list. Safe during the
        handler's loop: the callbacks after this one keep their positions, so each is still called once."""
        handler = self._calling_handler()
        if handler is None:
            return False
        callbacks = handler.callbacks
        if callbacks[0] is not self:
            callbacks.remove(self)
            callbacks.insert(0, self)
        return True

    def _place_console_filter(self) -> bool:
        """Put the console filter just before the first printer after this callback; ``False`` if there is
        no such printer. Called from ``on_log``, while the handler loops over its list: it only moves
        entries after this one, so every callback of this log is still called once."""
        handler = self._calling_handler()
        if handler is None:
            return False
        callbacks = handler.callbacks
        me = next(i for i, cb in enumerate(callbacks) if cb is self)
        printers = _console_printer_types()
        printer = next((cb for cb in callbacks[me + 1:] if isinstance(cb, printers)), None)
        if printer is None:
            return False
        at = next(i for i, cb in enumerate(callbacks) if cb is printer)
        if callbacks[at - 1] is not self._console_filter:
            # A filter left elsewhere by an earlier log: take it out, unless the loop has passed it.
            stale = [i for i, cb in enumerate(callbacks) if cb is self._console_filter and i > me]
            for i in reversed(stale):
                del callbacks[i]
            at = next(i for i, cb in enumerate(callbacks) if cb is printer)
            callbacks.insert(at, self._console_filter)
        return True

    def _warn_mixed_group(self, optimizer: int, group: int) -> None:
        self._warn_once(f"group {group}",
                        f"FARMSTrainerCallback: param group {group} holds parameters with different LR factors; it "
                        "uses their parameter-weighted mean. Pass one group per layer: optimizers=(torch.optim."
                        "AdamW(farms_lightning.farms_param_groups(model, lr=...)), None).")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=2)
