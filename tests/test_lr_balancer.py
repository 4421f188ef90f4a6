"""FARMSLRBalancer in real training: the LR used at every step is factor x the user's scheduled LR."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning_helpers import WeightSnapshots, loaders, trainer
from torch import nn

from farms_lightning import FARMSLRBalancer, analyze, farms_param_groups

STEPS_PER_EPOCH = 4
EPOCHS = 3


class RecordingSGD(torch.optim.SGD):
    """Records the LR of every group as the step runs (after the balancer's pre-hook)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.used: list[list[float]] = []

    def step(self, closure=None):
        self.used.append([group["lr"] for group in self.param_groups])
        return super().step(closure)


class LRNet(pl.LightningModule):
    def __init__(self, scheduler: str = "none", per_layer_groups: bool = True) -> None:
        super().__init__()
        self.scheduler, self.per_layer_groups = scheduler, per_layer_groups
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 24, 3), nn.BatchNorm2d(24),
                                      nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(384, 160), nn.ReLU(), nn.Linear(160, 120), nn.ReLU(),
                                  nn.Linear(120, 100), nn.ReLU(), nn.Linear(100, 10))

    def forward(self, x):
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        params = farms_param_groups(self, weight_decay=1e-4, no_decay_on_bias_and_norm=True) \
            if self.per_layer_groups else self.parameters()
        opt = RecordingSGD(params, lr=0.05, momentum=0.9)
        total = EPOCHS * STEPS_PER_EPOCH
        make = {
            "none": None,
            "lambda": lambda: {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.7 ** e)},
            "onecycle": lambda: {"scheduler": torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total),
                                 "interval": "step"},
            "cosine": lambda: {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)},
            "steplr": lambda: {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)},
            "plateau": lambda: {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
                                "monitor": "train_loss_epoch"},
            "warmup_cosine": lambda: {"scheduler": torch.optim.lr_scheduler.SequentialLR(opt, [
                torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - 3)], milestones=[3]),
                "interval": "step"},
        }[self.scheduler]
        return opt if make is None else {"optimizer": opt, "lr_scheduler": make()}


class ScheduledLR(pl.Callback):
    """The LR the user's schedule gives for each step, read before the step."""

    def __init__(self):
        self.scheduled: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.scheduled.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def _fit(tmp_path, scheduler="none", epochs=EPOCHS, ckpt_path=None, extra=(), balancer=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = LRNet(scheduler, **kwargs)
    balancer = balancer or FARMSLRBalancer(lr_min_ratio=0.2, lr_max_ratio=1.8, log_lr=True)
    scheduled, snaps = ScheduledLR(), WeightSnapshots()
    t = trainer(tmp_path, max_epochs=epochs, callbacks=[balancer, scheduled, snaps, *extra],
                limit_train_batches=STEPS_PER_EPOCH)
    t.fit(model, loaders()[0], ckpt_path=ckpt_path)
    return t, model, balancer, scheduled, snaps


def _expected_factors(state, s1=0.2, s2=1.8):
    model = LRNet()
    model.load_state_dict(state)
    report = analyze(model)
    # Layers too small to judge (the 10-class head) keep their place in the order, untuned.
    ordered = [s for s in report.layers if s.status in ("ok", "too_small")]
    tuned = [s.name for s in ordered[1:-1] if s.status == "ok"]
    alphas = [report[n].alpha for n in tuned]
    return {n: s1 + (s2 - s1) * (a - min(alphas)) / (max(alphas) - min(alphas)) for n, a in zip(tuned, alphas)}


@pytest.mark.parametrize("scheduler", ["none", "lambda", "onecycle", "cosine", "steplr", "plateau", "warmup_cosine"])
def test_used_lr_is_factor_times_scheduled_lr(tmp_path, scheduler):
    t, model, balancer, scheduled, snaps = _fit(tmp_path, scheduler)
    opt = t.optimizers[0]
    used = opt.used
    assert len(used) == len(scheduled.scheduled) == EPOCHS * STEPS_PER_EPOCH
    analyses = [h for h in balancer.history if h["stage"] in ("train_start", "epoch")]
    assert len(analyses) == EPOCHS + 1 and len(snaps.snapshots) == EPOCHS + 1
    # Factors equal the spec's mapping of analyze() alphas of the weights at each analysis.
    for entry, (_, state) in zip(analyses, snaps.snapshots):
        expected = _expected_factors(state)
        assert entry["lr_factors"].keys() == expected.keys() == {"head.0", "head.2", "head.4"}
        for name, factor in expected.items():
            assert entry["lr_factors"][name] == pytest.approx(factor, rel=1e-9)
    names = [g["name"] for g in opt.param_groups]
    for step, (lrs_used, lrs_scheduled) in enumerate(zip(used, scheduled.scheduled)):
        factors = analyses[step // STEPS_PER_EPOCH]["lr_factors"]  # the latest analysis before this epoch
        for name, lr_used, lr_scheduled in zip(names, lrs_used, lrs_scheduled):
            layer = name.removesuffix(".no_decay")
            assert lr_used == lr_scheduled * factors.get(layer, 1.0), (scheduler, step, name)
    # The user's LRs are left in place: the scheduler's own view is unscaled.
    assert all(lrs[0] == lrs[-1] for lrs in scheduled.scheduled)
    assert float(t.callback_metrics["farms/lr_factor/head.2"]) == pytest.approx(analyses[-1]["lr_factors"]["head.2"])
    # The logged effective LR of a layer is the LR its group used in the last step.
    position = names.index("head.2")
    assert float(t.callback_metrics["farms/lr/head.2"]) == pytest.approx(used[-1][position], rel=1e-6)


def test_resumed_run_uses_bit_identical_lrs(tmp_path):
    t_full, _, full, _, _ = _fit(tmp_path / "full", "cosine", epochs=4)
    full_used = t_full.optimizers[0].used
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    t1 = _fit(tmp_path / "part", "cosine", epochs=2, extra=[ckpt])[0]
    t2, _, resumed, _, _ = _fit(tmp_path / "part", "cosine", epochs=4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert t1.optimizers[0].used + t2.optimizers[0].used == full_used
    assert resumed.lr_factors == full.lr_factors


def test_warmup_epochs_keep_the_schedule_and_lr_monitor_sees_user_lrs(tmp_path):
    monitor = LearningRateMonitor(logging_interval="step")
    balancer = FARMSLRBalancer(balance_start_epoch=2)
    t, _, _, scheduled, _ = _fit(tmp_path, "cosine", balancer=balancer, extra=[monitor])
    used = t.optimizers[0].used
    assert used[:2 * STEPS_PER_EPOCH] == scheduled.scheduled[:2 * STEPS_PER_EPOCH]
    assert used[2 * STEPS_PER_EPOCH:] != scheduled.scheduled[2 * STEPS_PER_EPOCH:]
    # LearningRateMonitor reads the user's scheduled LR of the group, never the scaled one.
    seen = monitor.lrs["lr-RecordingSGD/head.2"]
    position = [g["name"] for g in t.optimizers[0].param_groups].index("head.2")
    assert seen == pytest.approx([lrs[position] for lrs in scheduled.scheduled], rel=1e-12)


def test_single_group_is_warned_and_equal_alphas_give_the_mid_factor(tmp_path):
    with pytest.warns(UserWarning, match="parameter-weighted mean"):
        t, _, balancer, scheduled, _ = _fit(tmp_path, "none", per_layer_groups=False)
    factors = balancer.history[0]["lr_factors"]
    sizes = {n: sum(p.numel() for p in balancer._layer_params[n]) for n in factors}
    total = sum(p.numel() for p in t.lightning_module.parameters())
    weighted = (sum(sizes[n] * factors[n] for n in factors) + total - sum(sizes.values())) / total
    assert t.optimizers[0].used[0][0] == pytest.approx(scheduled.scheduled[0][0] * weighted, rel=1e-12)


class FlatNet(LRNet):
    """A tuned position holds a frozen orthogonal 100x100 layer: flat spectrum, no alpha."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head = nn.Sequential(nn.Linear(384, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                                  nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
        nn.init.orthogonal_(self.head[2].weight)
        self.head[2].weight.requires_grad_(False)


def test_a_layer_without_fit_keeps_factor_one_and_is_reported(tmp_path):
    pl.seed_everything(0, verbose=False)
    balancer = FARMSLRBalancer()
    scheduled = ScheduledLR()
    t = trainer(tmp_path, max_epochs=2, callbacks=[balancer, scheduled], limit_train_batches=STEPS_PER_EPOCH)
    with pytest.warns(UserWarning, match="'head.2' has no alpha .*flat spectrum.*factor 1"):
        t.fit(FlatNet(), loaders()[0])
    assert set(balancer.lr_factors) == {"head.0", "head.4"}
    opt = t.optimizers[0]
    position = [g["name"] for g in opt.param_groups].index("head.2")
    assert all(u[position] == s[position] for u, s in zip(opt.used, scheduled.scheduled))
    assert sorted(balancer.lr_factors.values()) == [0.5, 1.5]


class TwoOptimizers(LRNet):
    """Manual optimization with two optimizers: the features and the head."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        features = RecordingSGD(farms_param_groups(self.features), lr=0.02)
        head = RecordingSGD(farms_param_groups(self.head), lr=0.05)
        return [features, head]


def test_manual_optimization_with_two_optimizers(tmp_path):
    pl.seed_everything(0, verbose=False)
    balancer = FARMSLRBalancer()
    t = trainer(tmp_path, max_epochs=2, callbacks=[balancer], limit_train_batches=STEPS_PER_EPOCH)
    t.fit(TwoOptimizers(), loaders()[0])
    analyses = [h for h in balancer.history if h["stage"] in ("train_start", "epoch")]
    owner = {id(p): name for name, params in balancer._layer_params.items() for p in params}
    for opt, base in zip(t.optimizers, (0.02, 0.05)):
        # Groups were built on submodules ("0", "2", ...): layers are found by parameter identity.
        layers = [owner.get(id(g["params"][0])) for g in opt.param_groups]
        assert len(opt.used) == 2 * STEPS_PER_EPOCH
        for step, lrs in enumerate(opt.used):
            factors = analyses[step // STEPS_PER_EPOCH]["lr_factors"]
            assert lrs == [base * factors.get(layer, 1.0) for layer in layers]
        assert [g["lr"] for g in opt.param_groups] == [base] * len(layers)
    assert set(analyses[-1]["lr_factors"]) == {"head.0", "head.2", "head.4"}
