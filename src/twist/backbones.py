"""Backbones: torchvision ResNets (with an optional CIFAR stem), the SwAV-style ResNet-50w2,
a small convnet for tiny images, and ViTs from timm.

Every backbone maps images (B, C, H, W) to pooled features (B, D) and carries its feature
dimension as ``feature_dim``. ResNets keep torchvision's parameter names (without ``fc``), so
their weights load into ``torchvision.models.resnet50()`` and friends.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from twist.config import ModelConfig


def _cifar_stem(net: ResNet, in_channels: int) -> None:
    """3x3 conv with stride 1 and no max-pool: 32 px images keep their detail."""
    net.conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()


def _set_in_channels(net: ResNet, in_channels: int) -> None:
    if in_channels != net.conv1.in_channels:
        old = net.conv1
        net.conv1 = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                              padding=old.padding, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")


def resnet50w2() -> ResNet:
    """ResNet-50 with every layer twice as wide (SwAV's 'resnet50w2': 4096-d output).

    Unlike torchvision's wide_resnet50_2, which widens only the 3x3 bottleneck convs, this
    doubles the stem and every stage's width.
    """
    net = ResNet(Bottleneck, [3, 4, 6, 3])
    w = 2
    net.inplanes = 64 * w
    net.conv1 = nn.Conv2d(3, 64 * w, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(64 * w)
    net.layer1 = net._make_layer(Bottleneck, 64 * w, 3)
    net.layer2 = net._make_layer(Bottleneck, 128 * w, 4, stride=2)
    net.layer3 = net._make_layer(Bottleneck, 256 * w, 6, stride=2)
    net.layer4 = net._make_layer(Bottleneck, 512 * w, 3, stride=2)
    net.fc = nn.Linear(512 * w * Bottleneck.expansion, 1000)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


class SmallCNN(nn.Module):
    """A small VGG-style convnet for tiny images (8-32 px: digits, MNIST, CIFAR-10), and for 64 px
    photo views with the stride-2 stem (photo-cpu).

    Three stages of 3x3 conv-BN-ReLU (widths w, 2w, 4w), max-pooling between them, then
    global average pooling: 4w-dimensional features. ``stride=2`` makes the first convolution a
    downsampling stem, so 64 px photos cost about what 32 px images do.
    """

    def __init__(self, in_channels: int = 1, width: int = 64, stride: int = 1):
        super().__init__()

        def block(cin: int, cout: int, step: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=step, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *block(in_channels, w, stride), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), *block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature_dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def build_backbone(cfg: ModelConfig, in_channels: int = 3) -> nn.Module:
    """The backbone named by ``cfg.backbone``, with its classifier removed."""
    name = cfg.backbone
    if name in ("resnet18", "resnet34", "resnet50", "resnet50w2"):
        net = resnet50w2() if name == "resnet50w2" else getattr(torchvision.models, name)(weights=None)
        feature_dim = net.fc.in_features
        if cfg.cifar_stem:
            _cifar_stem(net, in_channels)
        else:
            _set_in_channels(net, in_channels)
        net.fc = nn.Identity()
        net.feature_dim = feature_dim
        return net
    if name == "small_cnn":
        return SmallCNN(in_channels, cfg.small_cnn_width, cfg.small_cnn_stride)
    if name.startswith("vit_"):
        from twist.vit import build_vit

        return build_vit(cfg, in_channels)
    raise ValueError(f"unknown backbone '{name}'")
