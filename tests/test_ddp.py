"""Real DDP on CPU (ddp_spawn, 2 processes, gloo): ranks agree with each other and with one process."""

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning_helpers import TinyNet, loaders

from farms_lightning import FARMSCallback, FARMSMetric, analyze
from farms_lightning.engine.distributed import assign_layers
from farms_lightning.functional import farms_metrics
from farms_lightning.models.layers import discover_layers


class MetricNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.farms = FARMSMetric(matrix_metrics=True)  # alpha_weighted_mean too, as farms_metrics gives it
        self.metric_result: dict = {}

    def on_train_epoch_end(self) -> None:
        self.farms.update(self)
        self.metric_result = {k: v.item() for k, v in self.farms.compute().items()}


class Dump(pl.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        farms = next(cb for cb in trainer.callbacks if isinstance(cb, FARMSCallback))
        torch.save({
            "history": farms.history,
            "warm_starts": farms.state_dict()["warm_starts"],
            "metrics": {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("farms/")},
            "metric_result": pl_module.metric_result,
            "weights": pl_module.state_dict(),
        }, f"{self.folder}/rank{trainer.global_rank}.pt")


def test_layers_are_split_evenly_and_deterministically():
    layers = discover_layers(TinyNet())
    owner = assign_layers(layers, 2)
    assert owner == assign_layers(layers, 2) and set(owner) == {0, 1}
    loads = [sum(l.num_params for l, r in zip(layers, owner) if r == rank) for rank in (0, 1)]
    assert max(loads) <= sum(loads) - min(l.num_params for l in layers)


@pytest.mark.slow
def test_ddp_ranks_agree_with_each_other_and_with_one_process(tmp_path):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", max_epochs=2, limit_train_batches=3,
                         limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False, logger=False,
                         default_root_dir=str(tmp_path),
                         callbacks=[FARMSCallback(fit="peak", save_history="json", matrix_metrics=True),
                                    Dump(str(tmp_path))])
    trainer.fit(MetricNet(), loaders()[0])  # save_history asks for trainer.log_dir, a collective, on every rank
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 - NaN-safe
    assert same(rank0["history"], rank1["history"])  # bit for bit, the (slowest rank's) analysis time included
    assert (tmp_path / "farms_history.json").exists()
    assert same(rank0["metric_result"], rank1["metric_result"])
    assert rank0["metrics"] == rank1["metrics"]
    # Every rank holds every layer's lambda_max vectors (rank zero's state is the one checkpointed).
    solved = {row["name"] for row in rank0["history"][-1]["layers"] if row["lambda_max"] is not None}
    assert set(rank0["warm_starts"]) == set(rank1["warm_starts"]) == solved >= {"head.0", "head.2"}
    for name, vectors in rank0["warm_starts"].items():
        assert all(torch.equal(a, b) for a, b in zip(vectors, rank1["warm_starts"][name], strict=True))
    model = MetricNet()
    model.load_state_dict(rank0["weights"])
    single = analyze(model, fit="peak")
    last = {row["name"]: row for row in rank0["history"][-1]["layers"]}
    assert list(last) == list(single)
    for name, stats in single.items():
        assert last[name]["status"] == stats.status
        if stats.alpha is not None:
            assert last[name]["alpha"] == pytest.approx(stats.alpha, rel=1e-6)
            assert rank0["metrics"][f"farms/alpha/{name}"] == pytest.approx(stats.alpha, rel=1e-6)
        if stats.lambda_max is not None:
            assert last[name]["lambda_max"] == pytest.approx(stats.lambda_max, rel=2e-7)
    expected = farms_metrics(model)
    assert rank0["metric_result"].keys() == expected.keys()
    for key, value in expected.items():
        assert rank0["metric_result"][key] == pytest.approx(value.item(), rel=1e-6, nan_ok=True), key


class DumpBalancer(pl.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        from farms_lightning import FARMSLRBalancer

        balancer = next(cb for cb in trainer.callbacks if isinstance(cb, FARMSLRBalancer))
        torch.save({"factors": [h.get("lr_factors") for h in balancer.history],
                    "used": trainer.optimizers[0].used}, f"{self.folder}/balancer{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_use_identical_lr_factors(tmp_path):
    from test_lr_balancer import LRNet

    from farms_lightning import FARMSLRBalancer

    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", max_epochs=2, limit_train_batches=3,
                         enable_progress_bar=False, enable_model_summary=False, logger=False,
                         default_root_dir=str(tmp_path), callbacks=[FARMSLRBalancer(), DumpBalancer(str(tmp_path))])
    trainer.fit(LRNet("cosine"), loaders()[0])
    rank0, rank1 = (torch.load(tmp_path / f"balancer{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["factors"] == rank1["factors"] and len(rank0["factors"]) == 3
    assert all(f and len(f) == 3 for f in rank0["factors"])
    assert rank0["used"] == rank1["used"] and len(rank0["used"]) == 6
