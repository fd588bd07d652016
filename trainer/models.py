"""The networks: the lecture's MLP, a CNN that does much better (and the first, costlier CNN), the toy network.

Every model takes float32 images [N, 3, 128, 128] in [0, 1] and returns one logit
per image, shape [N, 1] (BCEWithLogitsLoss, as in the lecture).
"""

from __future__ import annotations

import torch
from torch import nn

from bitmoji.core.preprocess import CHANNELS, IMAGE_SIZE

INPUT_SIZE = CHANNELS * IMAGE_SIZE[0] * IMAGE_SIZE[1]


def linear_block(input_size: int, output_size: int, dropout: float = 0.1) -> nn.Sequential:
    """The lecture's building block: Linear -> LeakyReLU -> Dropout."""
    return nn.Sequential(nn.Linear(input_size, output_size), nn.LeakyReLU(), nn.Dropout(dropout))


class BitmojiClassifier(nn.Module):
    """The lecture's MLP, layer for layer (widths 128, 64, 32, 16, then one logit)."""

    def __init__(self, input_size: int = INPUT_SIZE, dropout: float = 0.1):
        super().__init__()
        self.main = nn.Sequential(
            nn.Flatten(),
            linear_block(input_size, 128, dropout),
            linear_block(128, 64, dropout),
            linear_block(64, 32, dropout),
            linear_block(32, 16, dropout),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution -> BatchNorm -> ReLU (no bias: BatchNorm has one)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class BitmojiCNN(nn.Module):
    """The default CNN: more accurate than BitmojiVGG (0.97 against 0.955-0.96) at a fraction of its cost.

    Cost, not accuracy, shaped it (docs/training.md tells the sweep; bench/pareto.py
    measures both). A 2x2 stride-2 patchify stem takes 128x128 to 64x64 with only
    `width` channels: the small figures that decide the hard stickers survive (a 4x4
    stem lost them), yet the 64x64 maps stay cheap. Stride-2 3x3 convolutions, not
    pooling, halve the resolution to 32x32, 16x16 and 8x8; the small maps afford more
    3x3 convolutions (one at 16x16, two at 8x8: the second at 8x8 took the sweep's mean of
    three seeds from 0.967 to 0.975 for 20% more time). The stem has no padding, so the [0, 1] inputs need
    no centring (its BatchNorm absorbs any scale); every BatchNorm follows a convolution,
    so `optimize_for_inference` can fold them all.
    """

    def __init__(self, width: int = 8, dropout: float = 0.1):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Sequential(
                nn.Conv2d(CHANNELS, w, 2, stride=2, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
            ),  # 64x64
            conv_block(w, 2 * w, stride=2),  # 32x32
            conv_block(2 * w, 4 * w, stride=2),  # 16x16
            conv_block(4 * w, 4 * w),
            conv_block(4 * w, 8 * w, stride=2),  # 8x8
            conv_block(8 * w, 8 * w),
            conv_block(8 * w, 8 * w),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(8 * w, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BitmojiVGG(nn.Module):
    """The first CNN (`--arch vgg`): a small VGG-style network, 0.96 at ten times the cost of BitmojiCNN.

    Kept so the comparison stays reproducible (bench/pareto.py).

    A strided stem brings 128x128 down to 64x64 at once (most of the cost of a
    CNN is in its first, largest feature maps); then three stages of two 3x3
    convolutions, each followed by 2x2 max pooling, double the channels as they
    halve the resolution; global average pooling makes the head independent of
    where the face sits in the sticker.
    """

    def __init__(self, width: int = 24, dropout: float = 0.2):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_block(CHANNELS, w, stride=2),  # 64x64
            conv_block(w, w),
            nn.MaxPool2d(2),  # 32x32
            conv_block(w, 2 * w),
            conv_block(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 16x16
            conv_block(2 * w, 4 * w),
            conv_block(4 * w, 4 * w),
            nn.MaxPool2d(2),  # 8x8
            conv_block(4 * w, 8 * w),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(8 * w, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Centre the [0, 1] inputs inside the model so the server needs no normalisation step.
        return self.head(self.features(x * 2.0 - 1.0))


class ToyNetwork(nn.Module):
    """The lecture's backpropagation walk-through: 1 input -> 2 sigmoid hidden units -> 1 output."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(1, 2)
        self.output = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.sigmoid(self.hidden(x)))

    @classmethod
    def lecture(cls) -> ToyNetwork:
        """The weights of the lecture's worked example."""
        net = cls()
        with torch.no_grad():
            net.hidden.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            net.hidden.bias.copy_(torch.tensor([1.0, 2.0]))
            net.output.weight.copy_(torch.tensor([[1.0, 2.0]]))
            net.output.bias.copy_(torch.tensor([-1.0]))
        return net


ARCHITECTURES = {"mlp": BitmojiClassifier, "cnn": BitmojiCNN, "vgg": BitmojiVGG}


def build_model(arch: str, dropout: float = 0.1) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](dropout=dropout)
