"""Warm starts of ``lambda_max``: the last analysis's top vector added to the fixed random start.

Every value is checked against a float64 ``torch.linalg.svdvals`` to ``RESIDUAL_RTOL``; speed is
checked as a property (fewer Lanczos steps), never as a time.
"""

import dataclasses
import math
import threading

import numpy as np
import pytest
import torch
from conftest import gaussian, heavy_tailed
from torch import nn

from farms_lightning.engine import distributed
from farms_lightning.engine import matrix_metrics as mm
from farms_lightning.engine.analysis import analyze_layers, resolve_settings
from farms_lightning.engine.threads import single_threaded_ops
from farms_lightning.engine.warm_starts import validate_warm_starts
from farms_lightning.models.layers import discover_layers

RTOL = mm.RESIDUAL_RTOL


@pytest.fixture(autouse=True)
def one_thread():
    with single_threaded_ops():  # as the analysis runs it; threaded SVDs crawl on busy cores
        yield


def top_sigma2(w: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(w.detach().double())[0]) ** 2


def moved(w: torch.Tensor, relative: float, seed: int) -> torch.Tensor:
    """``w`` plus Gaussian noise of Frobenius norm ``relative · ‖w‖_F``."""
    noise = torch.from_numpy(np.random.default_rng(seed).standard_normal(tuple(w.shape)))
    return w.double() + relative * noise * (w.double().norm() / noise.norm())


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return torch.from_numpy(q)


def close_top_two(rows: int, cols: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``U diag(s) Vᵀ`` with ``s2 = ratio · s1``, and ``u2``, the second singular vector on the smaller side."""
    s = torch.linspace(1.0, 0.3, min(rows, cols), dtype=torch.float64)
    s[1] = ratio
    u, v = _orthogonal(rows, 1)[:, :len(s)], _orthogonal(cols, 2)[:, :len(s)]
    second = u[:, 1] if rows <= cols else v[:, 1]
    return u @ torch.diag(s) @ v.T, second.contiguous()


# ----------------------------------------------------------------- (a) fewer steps, same value
@pytest.mark.parametrize("make", [gaussian, heavy_tailed], ids=["gaussian", "student-t"])
@pytest.mark.parametrize("shape", [(200, 640), (480, 240), (320, 320)])
def test_a_warm_start_after_a_small_move_is_exact_and_takes_fewer_steps(make, shape):
    before = make(*shape, seed=3).double()
    _, vector, _ = mm._lanczos(before)
    after = moved(before, 1e-2, seed=4)
    expected = top_sigma2(after)
    cold, _, cold_steps = mm._lanczos(after)
    warm, warm_vector, warm_steps = mm._lanczos(after, vector)
    assert cold == pytest.approx(expected, rel=RTOL) and warm == pytest.approx(expected, rel=RTOL)
    assert warm_steps < cold_steps
    assert warm_vector.dtype == torch.float64 and warm_vector.device.type == "cpu"
    assert warm_vector.shape == (min(shape),) and float(warm_vector.norm()) == pytest.approx(1.0, abs=1e-12)
    # The public function gives the same value and vector.
    top, public_vector = mm.lambda_max_with_vector(after, vector)
    assert top == warm and torch.equal(public_vector, warm_vector)


# ----------------------------------------------------------------- (b) a start at the second vector
@pytest.mark.parametrize("rows, cols", [(150, 400), (400, 150)])
@pytest.mark.parametrize("ratio", [0.99, 1 - 1e-4])
def test_b_a_start_at_or_near_the_second_singular_vector_still_finds_the_first(rows, cols, ratio, monkeypatch):
    w, second = close_top_two(rows, cols, ratio)
    expected = top_sigma2(w)
    noise = torch.from_numpy(np.random.default_rng(5).standard_normal(min(rows, cols)))
    for start in (second, -second, second + 1e-3 * noise / noise.norm(), 1e6 * second):
        top, _ = mm.lambda_max_with_vector(w, start)
        assert top == pytest.approx(expected, rel=RTOL)
    # The same start in place of the random one (not added to it) certifies the second value: the
    # case this matrix is built to catch.
    monkeypatch.setattr(mm.torch, "randn", lambda *args, **kwargs: second.clone())
    replaced, _, _ = mm._lanczos(w)
    assert replaced == pytest.approx(expected * ratio**2, rel=RTOL) and replaced < expected * (1 - RTOL)


@pytest.mark.parametrize("make", [gaussian, heavy_tailed], ids=["gaussian", "student-t"])
@pytest.mark.parametrize("shape", [(200, 600), (500, 260)])
def test_b_gaussian_matrices_started_at_their_lower_singular_vectors(make, shape):
    w = make(*shape, seed=7).double()
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    side = u if shape[0] <= shape[1] else vh.T
    for k in (1, 2, 5):
        top, _ = mm.lambda_max_with_vector(w, side[:, k].contiguous())
        assert top == pytest.approx(float(sigma[0]) ** 2, rel=RTOL), k


# ----------------------------------------------------------------- (c) invalid starts are ignored
INVALID_STARTS = {
    "too short": torch.ones(199, dtype=torch.float64),
    "too long": torch.ones(201),
    "NaN": torch.full((200,), math.nan),
    "inf": torch.cat([torch.ones(199), torch.tensor([math.inf])]),
    "zeros": torch.zeros(200),
    "integers": torch.ones(200, dtype=torch.int64),
    "booleans": torch.ones(200, dtype=torch.bool),
    "complex": torch.ones(200, dtype=torch.complex128),
    "2-D": torch.ones(200, 1),
    "a list": [1.0] * 200,
    "a string": "warm",
}


@pytest.mark.parametrize("name", list(INVALID_STARTS))
def test_c_an_invalid_start_is_ignored_bit_for_bit(name):
    w = gaussian(200, 500, seed=11)
    cold, cold_vector = mm.lambda_max_with_vector(w)
    assert cold == mm.lambda_max(w)
    top, vector = mm.lambda_max_with_vector(w, INVALID_STARTS[name])
    assert top == cold and torch.equal(vector, cold_vector)


def test_c_small_and_empty_matrices_give_their_eigenvector():
    w = gaussian(40, 90, seed=12).double()  # the direct eigvalsh path
    top, vector = mm.lambda_max_with_vector(w, torch.ones(40))
    assert top == mm.lambda_max(w) == pytest.approx(top_sigma2(w), rel=1e-12)
    gram = w @ w.T
    assert float((gram @ vector - top * vector).norm()) <= 1e-12 * top
    assert mm.lambda_max_with_vector(torch.zeros(0, 5)) == (0.0, pytest.approx(torch.zeros(0)))


# ----------------------------------------------------------------- (d) through the engine
def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(320, 200), nn.Conv2d(160, 180, 3, groups=2), nn.Linear(150, 40))


def _move(model: nn.Module, relative: float, seed: int) -> None:
    with torch.no_grad():
        for module in model:
            module.weight.copy_(moved(module.weight, relative, seed).float())


SETTINGS = resolve_settings(random_baseline=False)
#: Row fields that follow from lambda_max (equal to 1e-7 only); every other field is equal exactly.
FROM_LAMBDA_MAX = ("lambda_max", "log_spectral_norm", "stable_rank", "alpha_weighted")


def _rows(model, warm_starts=None, settings=SETTINGS):
    stats, _ = analyze_layers(discover_layers(model), settings, warm_starts=warm_starts)
    return [s.to_row() for s in stats]


def test_d_analyze_layers_learns_from_the_last_analysis():
    model = _model(0)
    warm: dict = {}
    first = _rows(model, warm)
    assert first == _rows(model)  # an empty dict is the fixed start
    assert list(warm) == ["0", "1", "2"]
    assert [len(warm[n]) for n in warm] == [1, 2, 1]  # one vector per matrix (the conv has 2 groups)
    assert [[len(v) for v in warm[n]] for n in warm] == [[200], [90, 90], [40]]  # the smaller side of each matrix
    previous = {n: list(v) for n, v in warm.items()}
    _move(model, 1e-2, seed=1)
    cold, warmed = _rows(model), _rows(model, warm)
    references = [top_sigma2(model[0].weight),
                  sum(top_sigma2(m) for m in model[1].weight.reshape(180, -1).chunk(2)) / 2,
                  top_sigma2(model[2].weight)]
    for row, reference, cold_row in zip(warmed, references, cold):
        assert row["status"] == "ok"
        assert row["lambda_max"] == pytest.approx(reference, rel=RTOL)
        for key, value in row.items():
            if key in FROM_LAMBDA_MAX:
                assert value == pytest.approx(cold_row[key], rel=2 * RTOL, abs=1e-12), key
            else:
                assert value == cold_row[key], key
    assert all(warm[n] is not previous[n] and not torch.equal(warm[n][0], previous[n][0]) for n in warm)


def test_d_entries_of_another_shape_are_ignored_and_layers_without_a_solve_get_none():
    model = _model(2)
    cold = _rows(model)
    junk = {"0": [torch.ones(7)], "1": [torch.ones(90)], "2": "junk", "gone": [torch.ones(3)]}  # "1": 1 of 2
    assert _rows(model, junk) == cold
    assert [len(junk[n]) for n in ("0", "1", "2")] == [1, 2, 1] and junk["gone"][0].shape == (3,)
    # whole_matrix=False solves nothing: the dict is left as it was.
    kept = {"0": [torch.ones(200)]}
    analyze_layers(discover_layers(model), SETTINGS, whole_matrix=False, warm_starts=kept)
    assert list(kept) == ["0"] and torch.equal(kept["0"][0], torch.ones(200))
    # A float64 full ESD holds lambda_max exactly: a linear layer needs no vector (a conv still does).
    full: dict = {}
    rows = _rows(model, full, resolve_settings(esd="full", random_baseline=False))
    assert sorted(full) == ["1"] and rows[0]["lambda_max"] == pytest.approx(top_sigma2(model[0].weight), rel=1e-12)


# ----------------------------------------------------------------- (e) determinism
def test_e_same_weights_and_same_dict_give_the_same_bits():
    model = _model(3)
    warm: dict = {}
    _rows(model, warm)
    _move(model, 1e-2, seed=2)
    one, two = {n: list(v) for n, v in warm.items()}, {n: list(v) for n, v in warm.items()}
    assert _rows(model, one) == _rows(model, two)
    assert all(torch.equal(a, b) for n in one for a, b in zip(one[n], two[n]))


# ----------------------------------------------------------------- distributed: one collective
def test_every_rank_receives_every_layers_vectors_in_the_one_gather(monkeypatch):
    """Two ranks simulated by two threads: each analyses its share and ends with every vector."""
    model = _model(4)
    single = {"0": [torch.ones(200)]}  # a start of the right length: it changes the bits
    expected_report, _ = distributed.analyze_distributed(model, SETTINGS, warm_starts=single)
    local = threading.local()
    slots: list = [None, None]
    barrier = threading.Barrier(2)
    calls = []

    def gather(out, obj):
        calls.append(local.rank)
        slots[local.rank] = obj
        barrier.wait()
        out[:] = slots

    monkeypatch.setattr(distributed, "distributed_context", lambda: (local.rank, 2))
    monkeypatch.setattr(distributed.dist, "all_gather_object", gather)
    results: list = [None, None]

    def rank(r: int) -> None:
        local.rank = r
        with single_threaded_ops():
            dicts = {"0": [torch.ones(200)]}  # as the single process had it
            report, _ = distributed.analyze_distributed(model, SETTINGS, warm_starts=dicts)
            results[r] = report, dicts

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls) == [0, 1]  # one all_gather_object per rank
    for report, dicts in results:
        assert [dataclasses.astuple(s) for s in report.layers] == [dataclasses.astuple(s) for s in
                                                                    expected_report.layers]
        assert sorted(dicts) == sorted(single)
        assert all(torch.equal(a, b) for n in single for a, b in zip(dicts[n], single[n]))


# ----------------------------------------------------------------- loaded state
def test_validate_warm_starts_keeps_bits_and_converts_to_float64_cpu():
    vector = torch.randn(5, dtype=torch.float64)
    out = validate_warm_starts({"a": [vector], "b": (torch.ones(3, dtype=torch.float32),), "c": []}, "state")
    assert torch.equal(out["a"][0], vector) and out["b"][0].dtype == torch.float64 and out["c"] == []


@pytest.mark.parametrize("value, words", [
    ([torch.ones(3)], "is a list, not a dict"),
    ({1: [torch.ones(3)]}, "layer name 1 is not a string"),
    ({"a": torch.ones(3)}, "holds a Tensor, not a list"),
    ({"a": [[1.0, 2.0]]}, "vector 0 is a list, not a dense tensor"),
    ({"a": [torch.ones(2, 2)]}, "2-D"),
    ({"a": [torch.ones(3, dtype=torch.int32)]}, "torch.int32"),
    ({"a": [torch.tensor([1.0, math.nan])]}, "non-finite"),
    ({"a": [torch.tensor([1.0, -math.inf])]}, "non-finite"),
    ({"a": [torch.ones(1 << 23, dtype=torch.float16)]}, "entries (at most"),
    ({"a": [torch.ones(1)] * ((1 << 16) + 1)}, "vectors (at most"),
    ({"a": [torch.ones(3).to_sparse()]}, "not a dense tensor"),
])
def test_validate_warm_starts_refuses_a_wrong_form_in_one_line(value, words):
    with pytest.raises(ValueError) as error:
        validate_warm_starts(value, "the checkpoint's warm starts")
    message = str(error.value)
    assert words in message and message.startswith("the checkpoint's warm starts") and "\n" not in message
