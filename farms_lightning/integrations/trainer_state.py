"""The state :class:`~farms_lightning.integrations.transformers.FARMSTrainerCallback` keeps in a Hugging
Face ``Trainer`` checkpoint, so that ``trainer.train(resume_from_checkpoint=...)`` continues its history.

The Trainer saves ``state.stateful_callbacks`` into every checkpoint's ``trainer_state.json`` and loads it
back on resume whatever ``restore_callback_states_from_checkpoint`` says. The callback writes its entry
there itself, under a key that names no class (``FARMSTrainerCallback:<prefix>``), rather than being an
``ExportableState``: with ``restore_callback_states_from_checkpoint=True`` the Trainer rebuilds every
``ExportableState`` callback from its saved arguments and swaps the copy in, so the user's own handle
(``farms.history``) would go stale, and a non-JSON argument would break the save. The entry holds one
strict JSON text (NaN as ``null``): ``trainer_state.json`` is written with sorted keys, which would
reorder the history's rows, and with bare ``NaN``, which is not JSON.

Nothing in it is trusted: the text is parsed with a depth bound, the history goes through
:func:`~farms_lightning.reporting.history.validate_history`, and the analysis settings must equal the
callback's, so a tampered or foreign state fails at once with one line, before any step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from farms_lightning.engine.spectra import resolve_dtype
from farms_lightning.files import strict_json
from farms_lightning.reporting.history import History, validate_factors, validate_history

#: Marks the entry as this callback's, and its layout's version.
STATE_FORMAT = "farms_lightning.FARMSTrainerCallback/1"
_FIELDS = ("settings", "history", "lr_factors", "pending", "pending_per_layer")


@dataclass
class CallbackState:
    """What a checkpoint restores: the history (up to the checkpoint's step), the latest LR factors, and
    the values of analyses not yet merged into a log (with which of them are per-layer keys)."""

    history: History
    lr_factors: dict[str, float]
    pending: dict[str, float]
    pending_per_layer: set[str]


def state_key(prefix: str) -> str:
    """The callback's key in ``state.stateful_callbacks`` (no class is named so: the Trainer never
    rebuilds the callback from it)."""
    return f"FARMSTrainerCallback:{prefix}"


def settings_key(settings: dict[str, Any]) -> dict[str, Any]:
    """The analysis settings as JSON values: what keys the random-matrix baseline cache and makes two
    analyses comparable (``dtype`` by the solver dtype it resolves to)."""
    key = {name: value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
           for name, value in settings.items()}
    if "dtype" in settings:
        key["dtype"] = str(resolve_dtype(settings["dtype"]))
    return key


def export_state(state: CallbackState, settings: dict[str, Any]) -> dict[str, str]:
    """The ``stateful_callbacks`` entry: ``{"format": STATE_FORMAT, "json": <strict JSON text>}``."""
    text = strict_json.dumps({"settings": settings_key(settings), "history": state.history,
                              "lr_factors": state.lr_factors, "pending": state.pending,
                              "pending_per_layer": sorted(state.pending_per_layer)})
    return {"format": STATE_FORMAT, "json": text}


def import_state(entry: Any, what: str, settings: dict[str, Any], global_step: int) -> CallbackState:
    """The state in a checkpoint's entry, validated, its history rewound to ``global_step`` (the
    checkpoint's step), as Lightning's callback restores it.

    Raises:
        ValueError: an entry of another form or format, text that is not strict JSON (or nests too
            deep), a history of a wrong form, LR factors or pending values that are not numbers,
            or analysis settings other than ``settings`` (one line naming ``what`` and the fault).
    """
    if not isinstance(entry, dict) or entry.get("format") != STATE_FORMAT or not isinstance(entry.get("json"), str):
        raise ValueError(f"{what} is not this callback's state (expected format {STATE_FORMAT!r})")
    value = strict_json.loads(entry["json"], what)
    if not isinstance(value, dict) or set(value) != set(_FIELDS):
        found = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"{what} holds {found}; expected the fields {list(_FIELDS)}")
    expected = settings_key(settings)
    if value["settings"] != expected:
        saved = value["settings"] if isinstance(value["settings"], dict) else {}
        differ = sorted(k for k in {*saved, *expected} if saved.get(k, "?") != expected.get(k, "?"))
        raise ValueError(f"{what} was made with other analysis settings ({', '.join(differ) or 'not an object'}); "
                         "resume with the same settings, or give this callback another prefix")
    history = validate_history(value["history"], f"{what}: history")
    factors = validate_factors(value["lr_factors"], f"{what}: lr_factors")
    pending = value["pending"]
    if not isinstance(pending, dict) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in pending.values()):
        raise ValueError(f"{what}: pending values are not an object of numbers")
    per_layer = value["pending_per_layer"]
    if not isinstance(per_layer, list) or not all(isinstance(k, str) and k in pending for k in per_layer):
        raise ValueError(f"{what}: pending_per_layer is not a list of pending keys")
    # Analyses after the checkpoint's step belong to a run that went on past it: they are redone.
    rewound = [h for h in history if h["step"] <= global_step]
    # A non-finite value was saved as null; it is logged as NaN, as the Trainer logs what it cannot show.
    values = {k: math.nan if v is None else float(v) for k, v in pending.items()}
    return CallbackState(rewound, factors, values, set(per_layer))
