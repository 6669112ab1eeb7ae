"""The model zoo: the torch models the orchestrator warms up and exports.

Every model maps ``[B, C, H, W]`` float32 images to ``[B, num_classes]`` logits and is
built from a name, a class count, the image geometry and a ``width`` (base channels or
embedding size), so tests can build narrow copies of the same architecture. Models hold
no state the exporter cannot see: parameters and, for BatchNorm, running statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from protocols.errors import ZoError

DEFAULT_MODEL = "resnet18-gn"


class ZooError(ZoError):
    """A model name, shape or checkpoint the zoo cannot serve."""


@dataclass(frozen=True)
class ModelInfo:
    """A zoo entry: how to build it and what it expects."""

    name: str
    description: str
    default_width: int
    builder: Callable[[int, int, int, int], nn.Module]  # (classes, channels, size, width)
    batchnorm: bool = False  # exported with running statistics as constants


def input_shape(in_channels: int = 3, image_size: int = 32) -> tuple[int, int, int]:
    """The per-sample input shape every zoo model takes (without the batch dimension)."""
    return (in_channels, image_size, image_size)


# --- a small CNN -------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Three conv-ReLU stages, two of them pooled, then global average pooling.

    Pooling only twice keeps 8x8 inputs (the digits set) at 2x2 before the global pool,
    and the adaptive pool makes the head independent of the image size.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --- CIFAR ResNet-18 ---------------------------------------------------------------------


def _norm(kind: str, channels: int) -> nn.Module:
    """GroupNorm with 2 groups (the usual federated choice: no batch statistics) or BN."""
    if kind == "gn":
        return nn.GroupNorm(math.gcd(2, channels), channels)
    return nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          _norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images: a 3x3 stride-1 stem and no max-pool (He et al., CIFAR)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64,
                 norm: str = "gn") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  _norm(norm, width), nn.ReLU())
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride, norm),
                                        BasicBlock(cout, cout, 1, norm)))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))))


# --- a small ViT -------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention written out with matmuls, so it exports op by op."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def patch_size_for(image_size: int) -> int:
    """The largest of 4, 2, 1 that divides the image into at least 4x4 patches."""
    for p in (4, 2, 1):
        if image_size % p == 0 and image_size // p >= 4:
            return p
    return 1


class ViT(nn.Module):
    """A small Vision Transformer: conv patch embedding, cls token, pre-norm blocks."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32,
                 width: int = 192, depth: int = 6, mlp_ratio: int = 2) -> None:
        super().__init__()
        heads = max(1, width // 64)
        if width % heads:
            raise ZooError(f"vit width {width} must be a multiple of its {heads} heads")
        patch = patch_size_for(image_size)
        tokens = (image_size // patch) ** 2
        self.patch = nn.Conv2d(in_channels, width, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls.expand(tokens.shape[0], -1, -1)
        h = self.blocks(torch.cat([cls, tokens], dim=1) + self.pos)
        return self.head(self.norm(h[:, 0]))


# --- the registry ------------------------------------------------------------------------


MODELS: dict[str, ModelInfo] = {m.name: m for m in (
    ModelInfo("cnn", "small CNN: 3 conv stages + global average pool (any image size >= 4)",
              32, lambda k, c, s, w: SmallCNN(k, c, w)),
    ModelInfo("resnet18-gn", "CIFAR ResNet-18 with GroupNorm (2 groups); the default",
              64, lambda k, c, s, w: ResNet18(k, c, w, "gn")),
    ModelInfo("resnet18-bn", "CIFAR ResNet-18 with BatchNorm (exported in eval mode)",
              64, lambda k, c, s, w: ResNet18(k, c, w, "bn"), batchnorm=True),
    ModelInfo("vit", "small ViT: patch 4 (2 for tiny images), 6 blocks, cls token",
              192, lambda k, c, s, w: ViT(k, c, s, w)),
)}


def model_names() -> list[str]:
    return list(MODELS)


def model_info(name: str) -> ModelInfo:
    try:
        return MODELS[name]
    except KeyError:
        raise ZooError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                width: int | None = None, seed: int | None = None) -> nn.Module:
    """A freshly initialized zoo model (seeded when ``seed`` is given), in eval mode."""
    info = model_info(name)
    if num_classes < 2:
        raise ZooError(f"num_classes must be at least 2, got {num_classes}")
    if image_size < 4 or in_channels < 1:
        raise ZooError(f"images must be at least 4x4 with >= 1 channel, got {in_channels}x"
                       f"{image_size}x{image_size}")
    width = info.default_width if width is None else width
    if width < 1:
        raise ZooError(f"width must be positive, got {width}")
    if seed is not None:
        torch.manual_seed(seed)
    return info.builder(num_classes, in_channels, image_size, width).eval()


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a ``torch.save``'d state_dict (or a dict holding one under "model"/"state_dict").

    Loading is strict: a checkpoint of another width or class count is an error that
    names the mismatched tensors, not a silently half-loaded model.
    """
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ZooError(f"{path} holds a {type(state).__name__}, not a state_dict; save one "
                       "with torch.save(model.state_dict(), path)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ZooError(f"{path} does not fit this model (check --model, --width, "
                       f"--num-classes, --in-channels): {str(exc)[:800]}") from None
