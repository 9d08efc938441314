"""Models of the experiments. None uses BatchNorm in training mode (its batch statistics couple
the examples, so per-example gradients, and Tr(F) from them, are not defined); the deep ones
normalize with GroupNorm instead."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def _model(name: str):
    def register(build):
        MODELS[name] = build
        return build
    return register


def build(name: str, dataset: str, classes: int) -> nn.Module:
    """Model ``name`` for ``dataset``; the MNIST-1D CNN takes (N, 1, 40), the others (N, 3, 32, 32)."""
    check(name, dataset)
    return MODELS[name](classes)


def check(name: str, dataset: str) -> None:
    """Raise ValueError unless model ``name`` exists and takes ``dataset``'s inputs."""
    if name not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {name!r}")
    one_d = name == "cnn1d"
    if one_d != (dataset == "mnist1d"):
        raise ValueError(f"model: {name!r} is for {'mnist1d' if one_d else 'CIFAR'} inputs, got dataset {dataset!r}")


@_model("cnn1d")
def cnn1d(classes: int = 10, width: int = 32) -> nn.Sequential:
    """Three strided Conv1d + ReLU layers and a Linear head: MNIST-1D's (N, 1, 40) to logits."""
    return nn.Sequential(nn.Conv1d(1, width, 5, stride=2, padding=2), nn.ReLU(),
                         nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(width * 5, classes))


@_model("simplecnn")
def simple_cnn(classes: int = 10) -> nn.Sequential:
    """Four 3x3 conv layers (32-32-64-64) with max-pooling, then two Linear layers."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, classes))


@_model("vgg11")
def vgg11(classes: int = 10) -> nn.Sequential:
    """VGG-11 for 32x32 inputs, without normalization layers, with one Linear classifier."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
            c_in = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, classes))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels)


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with a shortcut, a normalization layer after each convolution."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: Callable[[int], nn.Module] = _norm):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = norm(c_out)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm(c_out))

    def forward(self, x):
        out = self.relu1(self.norm1(self.conv1(x)))
        return self.relu2(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool); GroupNorm instead of BatchNorm unless
    ``norm`` (a factory from channels to a module) says otherwise."""

    def __init__(self, classes: int = 10, norm: Callable[[int], nn.Module] = _norm):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), norm(64), nn.ReLU())
        blocks, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c_in, c_out, stride, norm), BasicBlock(c_out, c_out, 1, norm)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class WideBlock(nn.Module):
    """Wide-ResNet's pre-activation block: norm, ReLU, 3x3 conv, twice, with a shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.norm1, self.relu1 = _norm(c_in), nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm2, self.relu2 = _norm(c_out), nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False)
                         if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        out = self.relu1(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.relu2(self.norm2(self.conv1(out))))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs ((depth - 4) / 6 blocks per stage), GroupNorm."""

    def __init__(self, classes: int = 10, depth: int = 16, k: int = 4):
        super().__init__()
        n = (depth - 4) // 6
        widths = (16 * k, 32 * k, 64 * k)
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks, c_in = [], 16
        for i, c_out in enumerate(widths):
            for j in range(n):
                blocks.append(WideBlock(c_in, c_out, 2 if (i > 0 and j == 0) else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(_norm(c_in), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(c_in, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


MODELS["resnet18"] = ResNet18
MODELS["wrn16_4"] = WideResNet
