"""Layer-wise sparsity allocation: AlphaPruning from FARMS alphas, and the uniform baseline.

AlphaPruning (docs/method.md) prunes a layer more the larger its heavy-tail exponent alpha (the less
trained it looks), keeping the parameter-weighted mean sparsity at the target. The allocation is a
plain ``{layer name: sparsity}`` dict, named as :func:`farms_lightning.analyze` names layers, that
any pruner can consume (:func:`farms_lightning.policies.pruners.prune_model`, ``FARMSModelPruning``).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Mapping, Sequence, Union

from torch import nn

from farms_lightning.engine.report import FARMSReport
from farms_lightning.models.layers import discover_layers

Alphas = Union[FARMSReport, Mapping[str, Union[float, None]]]
Blocks = Union[str, Sequence[str], None]

#: The published FARMS code sets every ratio above 1 to this sparsity (0.99999 when S = 0.7), once,
#: without rescaling the others (and so loses the exact mean).
REFERENCE_MAX_SPARSITY = 0.998


def alpha_sparsity(
    report_or_alphas: Alphas,
    sparsity: float,
    epsilon: float = 0.3,
    *,
    param_counts: Mapping[str, int] | None = None,
    blocks: Blocks = None,
    max_sparsity: float = 0.99,
) -> dict[str, float]:
    r"""AlphaPruning's per-layer sparsities, whose parameter-weighted mean is exactly ``sparsity``.

    With alphas ``a_i`` and parameter counts ``p_i`` of the layers that have an alpha:
    ``r_i = (a_i - a_min) / (a_max - a_min) * 2ε + (1 - ε)`` (``r_i = 1`` when all alphas are
    equal), ``scale = S * Σp_i / Σ(p_i * r_i)`` and ``sparsity_i = r_i * scale``: higher alpha is
    pruned more, and ``Σ p_i * sparsity_i = S * Σ p_i``.

    Layers above ``max_sparsity`` are clipped to it and the unclipped layers rescaled, repeatedly,
    until none exceeds it, so the weighted mean stays exactly ``S`` (possible since
    ``S <= max_sparsity``). The published FARMS code instead sets only ratios above 1 to 0.998
    (0.99999 when ``S = 0.7``), once, without rescaling, and so prunes less than asked (alphas
    2, 3, 6 with counts 1e6, 1e6, 1e5, ``S = 0.8``, ``ε = 0.3`` give 1.30 for the third layer
    before clipping).

    Layers without an alpha (``status`` skipped, too_small or failed, or ``None``/NaN in a dict) get ``S`` and
    take no part in the spread, so the overall weighted mean is still ``S``. Layers that share
    their weights with an earlier layer (``reason`` "shares weights with ...") are left out of the
    result: pruning the owner prunes them.

    Args:
        report_or_alphas: a :class:`~farms_lightning.FARMSReport` (``p_i`` = ``LayerStats.num_params``,
            the weight matrix only) or a ``{name: alpha or None}`` dict.
        sparsity: the target mean sparsity ``S``, ``0 <= S <= max_sparsity``.
        epsilon: the spread ``ε``, ``0 <= ε < 1`` (AlphaPruning's default 0.3; FARMS code 0.2).
        param_counts: with a dict of alphas, ``{name: number of parameters}`` for every name
            (default: equal weights, i.e. an unweighted mean). Not allowed with a report.
        blocks: block-wise mode: a glob (or list of globs, first match wins) whose match is a
            block's name prefix, e.g. ``"encoder.layer.*"`` makes ``encoder.layer.0`` a block. A
            block's alpha is the mean alpha of its matrices, broadcast back to each of them;
            matrices outside every block keep their own alpha, and matrices without an alpha
            still get ``S``.
        max_sparsity: the largest sparsity of any layer, ``0 < max_sparsity <= 1``.

    Returns:
        ``{layer name: sparsity}`` in the input's order.

    Raises:
        ValueError: ``sparsity``, ``epsilon``, ``max_sparsity``, ``param_counts`` or ``blocks`` out
            of range or inconsistent (the message names the argument).

    Example::

        >>> report = analyze(model, fit="peak", esd="farms")
        >>> sparsities = alpha_sparsity(report, sparsity=0.7, epsilon=0.3)
        >>> prune_model(model, sparsities, method="magnitude")
    """
    _check_fraction(max_sparsity, "max_sparsity", low_open=True)
    if not (isinstance(sparsity, (int, float)) and 0 <= sparsity <= max_sparsity):
        raise ValueError(f"`sparsity` must be in [0, max_sparsity={max_sparsity}], got {sparsity!r}")
    if not (isinstance(epsilon, (int, float)) and 0 <= epsilon < 1):
        raise ValueError(f"`epsilon` must be in [0, 1), got {epsilon!r}")
    alphas, counts = _alphas_and_counts(report_or_alphas, param_counts)
    if blocks is not None:
        alphas = _block_alphas(alphas, _globs(blocks))
    fitted = {name: a for name, a in alphas.items() if a is not None}
    result = {name: float(sparsity) for name in alphas}
    result.update(_spread(fitted, {name: counts[name] for name in fitted},
                          float(sparsity), float(epsilon), float(max_sparsity)))
    return result


def uniform_sparsity(layers: FARMSReport | nn.Module | Iterable[str], sparsity: float) -> dict[str, float]:
    """The baseline allocation: the same ``sparsity`` for every layer.

    Args:
        layers: a :class:`~farms_lightning.FARMSReport` (its layers, less those sharing weights
            with another), a model (its layers as :func:`farms_lightning.analyze` finds them by
            default) or layer names.
        sparsity: the sparsity of every layer, in ``[0, 1]``.

    Returns:
        ``{layer name: sparsity}``.

    Raises:
        ValueError: ``sparsity`` outside ``[0, 1]``.

    Example::

        >>> prune_model(model, uniform_sparsity(model, 0.5))
    """
    _check_fraction(sparsity, "sparsity")
    if isinstance(layers, FARMSReport):
        names: Iterable[str] = [s.name for s in layers.layers if not is_shared(s.reason)]
    elif isinstance(layers, nn.Module):
        names = [layer.name for layer in discover_layers(layers)]
    else:
        names = layers
    return {name: float(sparsity) for name in names}


def weighted_mean(sparsities: Mapping[str, float], param_counts: Mapping[str, int]) -> float:
    """The parameter-weighted mean of ``sparsities`` (``param_counts`` by the same names)."""
    total = sum(param_counts[name] for name in sparsities)
    return math.fsum(s * param_counts[name] for name, s in sparsities.items()) / total if total else math.nan


def _check_fraction(value: float, argument: str, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        raise ValueError(f"`{argument}` must be in {'(0' if low_open else '[0'}, 1], got {value!r}")


def is_shared(reason: str) -> bool:
    """Whether a layer's skip reason says it reads another layer's weights (pruned with that one)."""
    return reason.startswith("shares weights with")


def _alphas_and_counts(
    source: Alphas, param_counts: Mapping[str, int] | None
) -> tuple[dict[str, float | None], dict[str, int]]:
    if isinstance(source, FARMSReport):
        if param_counts is not None:
            raise ValueError("`param_counts` must be None with a FARMSReport (it has `num_params`)")
        layers = [s for s in source.layers if not is_shared(s.reason)]
        return {s.name: s.alpha for s in layers}, {s.name: s.num_params for s in layers}
    alphas = {name: _alpha_or_none(a) for name, a in source.items()}
    if param_counts is None:
        return alphas, {name: 1 for name in alphas}
    missing = [name for name in alphas if name not in param_counts]
    if missing:
        raise ValueError(f"`param_counts` lacks {len(missing)} layer(s), e.g. {missing[:3]}")
    counts = {name: param_counts[name] for name in alphas}
    if any(not (isinstance(c, int) and c >= 0) for c in counts.values()):
        raise ValueError(f"`param_counts` must be non-negative integers, got {counts}")
    return alphas, counts


def _alpha_or_none(alpha: float | None) -> float | None:
    if alpha is None or (isinstance(alpha, float) and math.isnan(alpha)):
        return None
    return float(alpha)


def _globs(blocks: Blocks) -> tuple[str, ...]:
    globs = (blocks,) if isinstance(blocks, str) else tuple(blocks or ())
    if not globs or not all(isinstance(g, str) and g for g in globs):
        raise ValueError(f"`blocks` must be a glob string or a list of them, got {blocks!r}")
    return globs


def block_of(name: str, globs: Sequence[str]) -> str | None:
    """The block ``name`` belongs to: the shortest dotted prefix of it that the first matching glob matches.

    Example::

        >>> block_of("encoder.layer.0.attention.self.query", ["encoder.layer.*"])
        'encoder.layer.0'
    """
    parts = name.split(".")
    for glob in globs:
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if fnmatch.fnmatchcase(prefix, glob):
                return prefix
    return None


def _block_alphas(alphas: dict[str, float | None], globs: Sequence[str]) -> dict[str, float | None]:
    """Each matrix's alpha replaced by its block's mean alpha (unweighted, as AlphaPruning's ``block_wise``)."""
    members: dict[str, list[float]] = {}
    block = {name: block_of(name, globs) for name in alphas}
    for name, a in alphas.items():
        if a is not None and block[name] is not None:
            members.setdefault(block[name], []).append(a)  # type: ignore[arg-type]
    return {
        name: (math.fsum(members[block[name]]) / len(members[block[name]])  # type: ignore[index]
               if a is not None and block[name] is not None else a)
        for name, a in alphas.items()
    }


def _spread(
    alphas: dict[str, float], counts: dict[str, int], sparsity: float, epsilon: float, max_sparsity: float
) -> dict[str, float]:
    """Spec §7 on the layers with an alpha, then clip-and-rescale until none exceeds ``max_sparsity``."""
    if not alphas:
        return {}
    a_min, a_max = min(alphas.values()), max(alphas.values())
    ratio = {
        name: 1.0 if a_max == a_min else (a - a_min) / (a_max - a_min) * 2 * epsilon + (1 - epsilon)
        for name, a in alphas.items()
    }
    budget = sparsity * math.fsum(counts.values())  # the weights to zero
    clipped: set[str] = set()
    while True:
        free = [name for name in alphas if name not in clipped]
        weight = math.fsum(counts[name] * ratio[name] for name in free)
        if weight == 0:  # no parameters left to rescale (all clipped or zero-sized): the rest take S
            scale = sparsity
            result = {name: sparsity for name in free}
            break
        if clipped:
            scale = (budget - max_sparsity * math.fsum(counts[name] for name in clipped)) / weight
        else:  # S * (Σp / Σpr): exactly S when all r_i = 1
            scale = sparsity * (math.fsum(counts.values()) / weight)
        result = {name: ratio[name] * scale for name in free}
        over = {name for name, s in result.items() if s > max_sparsity}
        if not over:
            break
        # Clipped layers take less than their share, which raises the free layers' scale: a layer
        # clipped once would exceed the bound again, so it stays clipped and the loop ends.
        clipped |= over
    result.update({name: max_sparsity for name in clipped})
    return {name: result[name] for name in alphas}
