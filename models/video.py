"""Video classifiers on clips of shape (batch, 3, frames, res, res), layer for layer as torchvision defines them.

    r2plus1d_18   31,505,325   Tran et al. 2018: ResNet-18 whose 3x3x3 convs are factorised into a 1x3x3
                               spatial and a 3x1x1 temporal conv, with the middle width chosen so that the
                               pair has the parameters of the full 3D conv (torchvision's Conv2Plus1D)
    s3d            8,320,048   Xie et al. 2018: Inception with every k x k x k conv separated into
                               1 x k x k then k x 1 x 1 (torchvision's S3D)

Defaults are the Kinetics-400 configurations: 16 frames of 112x112 for R(2+1)D, 16 of 224x224 for S3D.
Random init as in models/cnn.py (He-normal convs over fan-in, batch norm at identity).
"""

from __future__ import annotations

import torch
from torch import nn

from models.cnn import Branches, Built, conv_norm_act, he_init
from models.registry import ModelSpecError, register


def _clip(batch: int, frames: int, res: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, frames, res, res),)


# --- R(2+1)D-18 ------------------------------------------------------------------------------------

def _conv2plus1d(cin: int, cout: int, mid: int, stride: int = 1) -> nn.Sequential:
    """1x3x3 spatial conv (cin -> mid), BN, ReLU, 3x1x1 temporal conv (mid -> cout); both strided."""
    return nn.Sequential(nn.Conv3d(cin, mid, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
                         nn.BatchNorm3d(mid), nn.ReLU(inplace=True),
                         nn.Conv3d(mid, cout, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False))


class Block2plus1d(nn.Module):
    """ResNet basic block with (2+1)D convs; one middle width for both, from the block's in/out widths."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        mid = cin * cout * 27 // (cin * 9 + 3 * cout)  # parameters of a full 3x3x3 conv cin -> cout
        self.conv1 = nn.Sequential(_conv2plus1d(cin, cout, mid, stride), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(_conv2plus1d(cout, cout, mid), nn.BatchNorm3d(cout))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = conv_norm_act(cin, cout, 1, stride, act=None, dims=3) \
            if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class R2Plus1D(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 400) -> None:
        super().__init__()
        self.stem = nn.Sequential(  # (2+1)D stem: 1x7x7 spatial to 45 channels, 3x1x1 temporal to 64
            nn.Conv3d(3, 45, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False), nn.BatchNorm3d(45), nn.ReLU(inplace=True),
            nn.Conv3d(45, 64, (3, 1, 1), 1, (1, 0, 0), bias=False), nn.BatchNorm3d(64), nn.ReLU(inplace=True))
        cin, stages = 64, []
        for i, (cout, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            stages.append(nn.Sequential(*(Block2plus1d(cin if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1)
                                          for j in range(count))))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(1), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x))))))


@register("r2plus1d_18", small={"batch": 1, "frames": 4, "res": 32}, family="video")
def r2plus1d_18(batch: int = 1, frames: int = 16, res: int = 112, num_classes: int = 400) -> Built:
    """R(2+1)D-18 (Tran et al. 2018): 31,505,325 parameters."""
    return he_init(R2Plus1D(num_classes=num_classes)), _clip(batch, frames, res)


# --- S3D -------------------------------------------------------------------------------------------

def _cna3(cin: int, cout: int, kernel: int | tuple[int, int, int], stride: int | tuple[int, int, int] = 1,
          padding: int | tuple[int, int, int] = 0) -> nn.Sequential:
    return conv_norm_act(cin, cout, kernel, stride, padding, eps=1e-3, momentum=1e-3, dims=3)


def _separable(cin: int, cout: int, k: int, stride: int, pad: int) -> nn.Sequential:
    """A k x k x k conv separated into 1 x k x k (spatial) then k x 1 x 1 (temporal), each with BN and ReLU."""
    return nn.Sequential(_cna3(cin, cout, (1, k, k), (1, stride, stride), (0, pad, pad)),
                         _cna3(cout, cout, (k, 1, 1), (stride, 1, 1), (pad, 0, 0)))


def _sep_inception(cin: int, b0: int, b1_mid: int, b1: int, b2_mid: int, b2: int, b3: int) -> Branches:
    return Branches(_cna3(cin, b0, 1),
                    nn.Sequential(_cna3(cin, b1_mid, 1), _separable(b1_mid, b1, 3, 1, 1)),
                    nn.Sequential(_cna3(cin, b2_mid, 1), _separable(b2_mid, b2, 3, 1, 1)),
                    nn.Sequential(nn.MaxPool3d(3, 1, 1), _cna3(cin, b3, 1)))


def s3d_feature_size(frames: int, res: int) -> tuple[int, int]:
    """(time, height) of S3D's last feature map: stride-2 conv and three padded pools round up, the last pool down."""
    t, h = (frames + 1) // 2, (res + 1) // 2  # separable stem conv, stride 2 in time and space
    h = (h + 1) // 2  # 1x3x3 max-pool, stride 2 in space
    h = (h + 1) // 2  # second 1x3x3 max-pool
    t, h = (t + 1) // 2, (h + 1) // 2  # 3x3x3 max-pool, stride 2
    return t // 2, h // 2  # 2x2x2 max-pool, stride 2, no padding


class S3D(nn.Module):
    """S3D; `pool` is the final average-pool window, (2, 7, 7) at 16 x 224 x 224, clipped for smaller clips."""

    def __init__(self, num_classes: int = 400, pool: tuple[int, int, int] = (2, 7, 7), dropout: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _separable(3, 64, 7, 2, 3), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            _cna3(64, 64, 1), _separable(64, 192, 3, 1, 1), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            _sep_inception(192, 64, 96, 128, 16, 32, 32), _sep_inception(256, 128, 128, 192, 32, 96, 64),
            nn.MaxPool3d(3, 2, 1),
            _sep_inception(480, 192, 96, 208, 16, 48, 64), _sep_inception(512, 160, 112, 224, 24, 64, 64),
            _sep_inception(512, 128, 128, 256, 24, 64, 64), _sep_inception(512, 112, 144, 288, 32, 64, 64),
            _sep_inception(528, 256, 160, 320, 32, 128, 128),
            nn.MaxPool3d(2, 2, 0),
            _sep_inception(832, 256, 160, 320, 32, 128, 128), _sep_inception(832, 384, 192, 384, 48, 128, 128))
        self.avgpool = nn.AvgPool3d(pool, 1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Conv3d(1024, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x))).mean((2, 3, 4))  # average the clip's windows


@register("s3d", small={"batch": 1, "frames": 8, "res": 32}, family="video")
def s3d(batch: int = 1, frames: int = 16, res: int = 224, num_classes: int = 400) -> Built:
    """S3D (Xie et al. 2018): 8,320,048 parameters."""
    t, h = s3d_feature_size(frames, res)
    if t < 1 or h < 1:
        raise ModelSpecError(f"model 's3d': frames={frames}, res={res} is too small; it needs frames >= 5, res >= 17")
    return he_init(S3D(num_classes, (min(2, t), min(7, h), min(7, h)))), _clip(batch, frames, res)
