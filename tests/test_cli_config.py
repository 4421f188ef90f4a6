"""The callback is configurable from LightningCLI (command-line arguments and YAML)."""

import pytest
from lightning.pytorch.cli import LightningCLI
from lightning_helpers import TinyNet

from farms_lightning import FARMSCallback

pytest.importorskip("jsonargparse")


def _farms(cli):
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, FARMSCallback))


def test_callback_from_command_line_arguments(tmp_path):
    cli = LightningCLI(TinyNet, run=False, save_config_callback=None, args=[
        f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu",
        "--trainer.callbacks+=farms_lightning.FARMSCallback",
        "--trainer.callbacks.fit=peak", "--trainer.callbacks.every_n_epochs=2",
        "--trainer.callbacks.include=[head.*]", "--trainer.callbacks.dtype=float64",
    ])
    farms = _farms(cli)
    assert farms.settings["fit"] == "peak" and farms.every_n_epochs == 2 and farms.include == ["head.*"]
    assert farms.settings["dtype"] == "float64"


def test_callback_from_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"""
trainer:
  default_root_dir: {tmp_path}
  accelerator: cpu
  callbacks:
    - class_path: farms_lightning.FARMSCallback
      init_args:
        preset: llm
        window: 64
        log_metrics: [alpha, stable_rank]
        exclude: ["features.*"]
        save_history: json
""")
    cli = LightningCLI(TinyNet, run=False, save_config_callback=None, args=["--config", str(config)])
    farms = _farms(cli)
    assert farms.settings["window"] == 64 and farms.settings["fit"] == "peak"
    assert farms.log_metrics == ("alpha", "stable_rank") and farms.exclude == ["features.*"]
