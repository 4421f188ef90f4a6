"""Make docs/tensorboard.png: TensorBoard on a real run of the README's first example, as a person sees it.

    python docs/tensorboard_screenshot.py            # about 40 s on 2 cores; needs `apt-get install chromium`

Trains the README's digits MLP for 5 epochs with ``FARMSCallback()`` at its defaults (Lightning's
default ``TensorBoardLogger``, into a temporary folder), starts ``tensorboard`` on that folder on
127.0.0.1, and takes a headless-Chromium screenshot of the Time Series tab filtered to the
per-layer ``farms_by_layer/alpha_delta`` chart (one line per layer) and the ``farms/alpha_heatmap``
image. Pass ``--logdir`` to screenshot an existing log folder instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def train(logdir: Path) -> None:
    """The README's first run (digits MLP, 5 epochs, FARMSCallback() defaults), logged under ``logdir``."""
    import lightning.pytorch as pl
    import torch
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from farms_lightning import FARMSCallback

    class DigitsMLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                     nn.Linear(256, 10))

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    pl.seed_everything(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    train_loader = DataLoader(TensorDataset(x, torch.tensor(digits.target)), batch_size=64, shuffle=True)
    trainer = pl.Trainer(max_epochs=5, callbacks=[FARMSCallback()], default_root_dir=str(logdir),
                         accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DigitsMLP(), train_loader)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def wait_for_tags(port: int, seconds: float) -> None:
    """Until TensorBoard serves the per-layer runs' ``alpha_delta`` and the heatmap image."""
    deadline = time.monotonic() + seconds
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as reply:
            scalars = json.load(reply)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/images/tags", timeout=5) as reply:
            images = json.load(reply)
        layer_runs = [run for run, tags in scalars.items() if "farms_by_layer/alpha_delta" in tags]
        if layer_runs and any("farms/alpha_heatmap" in tags for tags in images.values()):
            time.sleep(2)  # every run is listed once its tags are in; give the last one a moment
            return
        if time.monotonic() > deadline:
            raise TimeoutError("TensorBoard did not load the per-layer runs and the heatmap in time")
        time.sleep(1)


def screenshot(logdir: Path, output: Path, width: int, height: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs Chromium: apt-get install chromium")
    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
                              "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/data/runs", 60)
        wait_for_tags(port, 60)  # the event files are loaded in the background: draw only once they are in
        # Time Series tab, filtered to the per-layer alpha_delta chart and the heatmap image.
        # (forceSVG: headless Chromium has no WebGL, with which TensorBoard draws lines by default.)
        url = f"http://127.0.0.1:{port}/?forceSVG=true&tagFilter=alpha_delta%24%7Calpha_heatmap#timeseries"
        with tempfile.TemporaryDirectory(prefix="farms-chromium-") as profile:
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--user-data-dir={profile}", f"--window-size={width},{height}",
                            "--virtual-time-budget=30000", f"--screenshot={output}", url],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    finally:
        board.terminate()
        board.wait(timeout=30)
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", type=Path, help="an existing log folder (default: train the README's example)")
    parser.add_argument("-o", "--output", type=Path, default=DOCS / "tensorboard.png")
    parser.add_argument("--size", default="1400x1100", help="window size in pixels, WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    if args.logdir is not None:
        screenshot(args.logdir, args.output, width, height)
        return
    with tempfile.TemporaryDirectory(prefix="farms-tensorboard-") as tmp:
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        train(Path(tmp))
        screenshot(Path(tmp) / "lightning_logs", args.output, width, height)


if __name__ == "__main__":
    main()
