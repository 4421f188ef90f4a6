import math

import pytest
import torch
from lightning_helpers import TinyNet
from torch import nn

from farms_lightning import FARMSMetric, analyze
from farms_lightning.functional import farms_metrics


@pytest.mark.parametrize("matrix_metrics", [None, True])
def test_metric_equals_functional_and_analyze(matrix_metrics):
    torch.manual_seed(0)
    model = TinyNet()
    metric = FARMSMetric(fit="peak", matrix_metrics=matrix_metrics)
    metric.update(model)
    result = metric.compute()
    assert result.keys() == farms_metrics(model, fit="peak").keys()
    report = analyze(model, fit="peak")
    for name, stats in report.items():
        if stats.alpha is not None:
            assert result[f"alpha/{name}"].item() == stats.alpha
            assert result[f"alpha_delta/{name}"].item() == stats.alpha_delta
        else:
            assert f"alpha/{name}" not in result
    for key, value in report.summary.items():
        if key == "alpha_weighted_mean" and not matrix_metrics:  # whole-matrix metrics not computed
            assert math.isnan(result[key].item()) and not math.isnan(value)
            continue
        assert result[key].item() == pytest.approx(value, rel=1e-12, nan_ok=True), key
    assert bool(metric.warm_starts) == bool(matrix_metrics)  # lambda_max vectors, for the next update


def test_metric_warm_starts_survive_reset_and_keep_lambda_max_exact():
    torch.manual_seed(0)
    model = TinyNet()
    metric = FARMSMetric(random_baseline=False, matrix_metrics=True)
    metric.update(model)
    first = metric.compute()["alpha_weighted_mean"].item()
    starts = dict(metric.warm_starts)
    metric.reset()
    assert metric.warm_starts == starts and sorted(starts) == sorted(analyze(model).alphas)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)  # lambda_max x 1.0201: alpha_weighted_mean moves by alpha_mean · log10(1.0201)
    metric.update(model)
    assert metric.warm_starts.keys() == starts.keys() and all(metric.warm_starts[n] is not starts[n] for n in starts)
    expected = analyze(model, random_baseline=False).summary["alpha_weighted_mean"]
    assert metric.compute()["alpha_weighted_mean"].item() == pytest.approx(expected, rel=1e-7)
    assert expected != pytest.approx(first, rel=1e-4)


def test_update_is_a_snapshot_and_reset_clears():
    torch.manual_seed(0)
    model = TinyNet()
    metric = FARMSMetric()
    metric.update(model)
    with torch.no_grad():
        model.head[0].weight.mul_(3.0).add_(torch.randn_like(model.head[0].weight) ** 3)
    metric.update(model)
    assert metric.compute()["alpha/head.0"].item() == analyze(model)["head.0"].alpha
    metric.reset()
    assert metric.compute()["num_layers"].item() == 0


def test_metric_owned_by_a_model_keeps_its_state_dict_clean():
    torch.manual_seed(0)
    model = TinyNet()
    model.farms = FARMSMetric()
    model.farms.update(model)
    keys = list(model.state_dict())
    assert all(not k.startswith("farms.") for k in keys)  # no module (or weights) stored in the metric
    copy = TinyNet()
    copy.farms = FARMSMetric()
    copy.load_state_dict(model.state_dict())
    assert "alpha/head.0" in model.farms.compute()


def test_plot_follows_the_torchmetrics_convention():
    pytest.importorskip("matplotlib")
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 128))
    metric = FARMSMetric()
    metric.update(model)
    fig, ax = metric.plot()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]
    heights = [bar.get_height() for bar in ax.containers[0]]
    assert heights == pytest.approx([metric.compute()["alpha/0"].item(), metric.compute()["alpha/1"].item()])


def test_rows_of_other_ranks_are_never_reported_as_fitted(monkeypatch):
    from farms_lightning.engine import distributed

    torch.manual_seed(0)
    model = TinyNet()
    monkeypatch.setattr(distributed, "distributed_context", lambda: (1, 2))  # rank 1 of 2, states not synced
    metric = FARMSMetric(sync_on_compute=False)
    metric.update(model)
    result = metric.compute()
    fitted = {k.removeprefix("alpha/") for k in result if k.startswith("alpha/")}
    expected = analyze(model)
    assert fitted and all(result[f"alpha/{n}"].item() == expected[n].alpha for n in fitted)
    assert result["num_fitted"].item() == len(fitted) < expected.summary["num_fitted"]
    assert all(v.item() != 0.0 for k, v in result.items() if k.startswith("alpha/"))


def test_metric_labels_and_the_baseline_opt_out():
    torch.manual_seed(0)
    model = TinyNet()
    metric = FARMSMetric()  # cv preset: median fit, labels relative to the random baseline
    metric.update(model)
    result = metric.compute()
    report = analyze(model)
    # Random-init layers look random; WeightWatcher's labels are not assessed outside full-ESD ks fits.
    assert result["num_looks_random"].item() == report.summary["num_looks_random"] == report.summary["num_fitted"]
    assert result["num_too_small"].item() == report.summary["num_too_small"] == 1  # the 10-class head
    assert torch.isnan(result["num_under_trained"]) and torch.isnan(result["num_over_trained"])
    assert result["alpha_random_mean"].item() == pytest.approx(report.summary["alpha_random_mean"], rel=1e-12)
    plain = FARMSMetric(random_baseline=False)
    plain.update(model)
    values = plain.compute()
    assert not any(k.startswith("alpha_delta/") for k in values) and torch.isnan(values["alpha_random_mean"])
    assert values.keys() == farms_metrics(model, random_baseline=False).keys()
