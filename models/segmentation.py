"""Semantic segmentation networks, layer for layer as torchvision defines them, 21 (Pascal VOC) classes.

    fcn_resnet50                Long et al. 2015 head on a dilated ResNet-50      32,957,013  (35,322,218 with aux)
    deeplabv3_resnet50          Chen et al. 2017 (ASPP, rates 12/24/36), same     39,638,869  (42,004,074 with aux)
    lraspp_mobilenet_v3_large   Howard et al. 2019 (LR-ASPP on MobileNetV3-Large)  3,221,538

The ResNet-50 backbones replace the strides of stages 3 and 4 by dilation 2 and 4 (output stride 8);
the MobileNetV3 one dilates its last stage (output stride 16) and feeds LR-ASPP its stride-8 features.
The logits are bilinearly upsampled to the input size and returned as one tensor, so that captured graphs
are plain. The auxiliary FCN head on stage 3 (torchvision's aux_loss) is off by default; with aux=True
the forward returns (out, aux_out), both at input size. The with-aux counts are the ones torchvision
publishes; the without-aux counts follow from them by subtracting the aux head (1024*256*9 conv,
256-wide BN, 256->21 1x1 conv with bias: 2,365,205 parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.cnn import Built, ResNet, conv_norm_act, he_init, images, make_divisible
from models.registry import register


def _upsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def fcn_head(cin: int, num_classes: int) -> nn.Sequential:
    """3x3 conv to cin/4 channels, BN, ReLU, dropout, 1x1 conv to the classes."""
    return nn.Sequential(conv_norm_act(cin, cin // 4, 3), nn.Dropout(0.1), nn.Conv2d(cin // 4, num_classes, 1))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1, three dilated 3x3 and an image-pooling branch, projected to 256."""

    def __init__(self, cin: int, rates: tuple[int, ...] = (12, 24, 36), cout: int = 256) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_norm_act(cin, cout, 1)]
                                      + [conv_norm_act(cin, cout, 3, dilation=r) for r in rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_norm_act(cin, cout, 1))
        self.project = nn.Sequential(conv_norm_act((len(rates) + 2) * cout, cout, 1), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = _upsample(self.image_pool(x), x)
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], 1))


class DilatedResNetSegmenter(nn.Module):
    """Dilated ResNet-50 backbone, a head on stage 4, optionally the aux FCN head on stage 3."""

    def __init__(self, head: nn.Module, num_classes: int, aux: bool) -> None:
        super().__init__()
        self.backbone = ResNet((3, 4, 6, 3), num_classes=None, dilate=(False, True, True))
        self.head = head
        self.aux_head = fcn_head(1024, num_classes) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        c3, c4 = self.backbone.stages(x)
        out = _upsample(self.head(c4), x)
        if self.aux_head is None:
            return out
        return out, _upsample(self.aux_head(c3), x)


@register("fcn_resnet50", small={"batch": 1, "res": 32}, family="segmentation")
def fcn_resnet50(batch: int = 1, res: int = 520, num_classes: int = 21, aux: bool = False) -> Built:
    """FCN (Long et al. 2015) on dilated ResNet-50: 32,957,013 parameters (35,322,218 with aux)."""
    return he_init(DilatedResNetSegmenter(fcn_head(2048, num_classes), num_classes, aux)), images(batch, res)


@register("deeplabv3_resnet50", small={"batch": 1, "res": 32}, family="segmentation")
def deeplabv3_resnet50(batch: int = 1, res: int = 520, num_classes: int = 21, aux: bool = False) -> Built:
    """DeepLabV3 (Chen et al. 2017) on dilated ResNet-50: 39,638,869 parameters (42,004,074 with aux)."""
    head = nn.Sequential(ASPP(2048), conv_norm_act(256, 256, 3), nn.Conv2d(256, num_classes, 1))
    return he_init(DilatedResNetSegmenter(head, num_classes, aux)), images(batch, res)


# --- MobileNetV3-Large + LR-ASPP -------------------------------------------------------------------

_BN3 = {"eps": 1e-3, "momentum": 1e-2}  # MobileNetV3's batch-norm settings


class SqueezeExcite(nn.Module):
    """Channel attention: global pool, 1x1 squeeze (ReLU), 1x1 excite (hard sigmoid), rescale the input."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, squeeze, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(squeeze, channels, 1), nn.Hardsigmoid(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x) * x


class InvertedResidualV3(nn.Module):
    """MobileNetV3 block: optional 1x1 expand, k x k depthwise (stride or dilation), optional SE, 1x1 project."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, act: type[nn.Module],
                 stride: int, dilation: int) -> None:
        super().__init__()
        layers = [conv_norm_act(cin, expanded, 1, act=act, **_BN3)] if expanded != cin else []
        layers.append(conv_norm_act(expanded, expanded, kernel, 1 if dilation > 1 else stride, groups=expanded,
                                    dilation=dilation, act=act, **_BN3))
        if se:
            layers.append(SqueezeExcite(expanded, make_divisible(expanded // 4)))
        layers.append(conv_norm_act(expanded, cout, 1, act=None, **_BN3))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


# (in, kernel, expanded, out, squeeze-excite, hard-swish, stride, dilation), Howard et al. 2019, Table 1;
# the last stage is dilated instead of strided, as for segmentation
MOBILENET_V3_LARGE_DILATED = (
    (16, 3, 16, 16, False, False, 1, 1), (16, 3, 64, 24, False, False, 2, 1), (24, 3, 72, 24, False, False, 1, 1),
    (24, 5, 72, 40, True, False, 2, 1), (40, 5, 120, 40, True, False, 1, 1), (40, 5, 120, 40, True, False, 1, 1),
    (40, 3, 240, 80, False, True, 2, 1), (80, 3, 200, 80, False, True, 1, 1), (80, 3, 184, 80, False, True, 1, 1),
    (80, 3, 184, 80, False, True, 1, 1), (80, 3, 480, 112, True, True, 1, 1), (112, 3, 672, 112, True, True, 1, 1),
    (112, 5, 672, 160, True, True, 2, 2), (160, 5, 960, 160, True, True, 1, 2), (160, 5, 960, 160, True, True, 1, 2))
LRASPP_LOW_BLOCKS = 4  # the low-level features are the output of block 4, the last one at stride 8


class LRASPPMobileNetV3(nn.Module):
    def __init__(self, num_classes: int = 21, inter: int = 128) -> None:
        super().__init__()
        blocks = [InvertedResidualV3(cin, k, e, cout, se, nn.Hardswish if hs else nn.ReLU, s, d)
                  for cin, k, e, cout, se, hs, s, d in MOBILENET_V3_LARGE_DILATED]
        self.low = nn.Sequential(conv_norm_act(3, 16, 3, 2, act=nn.Hardswish, **_BN3), *blocks[:LRASPP_LOW_BLOCKS])
        self.high = nn.Sequential(*blocks[LRASPP_LOW_BLOCKS:], conv_norm_act(160, 960, 1, act=nn.Hardswish, **_BN3))
        low_channels = MOBILENET_V3_LARGE_DILATED[LRASPP_LOW_BLOCKS - 1][3]
        self.cbr = conv_norm_act(960, inter, 1)
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(960, inter, 1, bias=False), nn.Sigmoid())
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low(x)
        high = self.high(low)
        context = _upsample(self.cbr(high) * self.scale(high), low)
        return _upsample(self.low_classifier(low) + self.high_classifier(context), x)


@register("lraspp_mobilenet_v3_large", small={"batch": 1, "res": 32}, family="segmentation")
def lraspp_mobilenet_v3_large(batch: int = 1, res: int = 520, num_classes: int = 21) -> Built:
    """LR-ASPP on MobileNetV3-Large (Howard et al. 2019): 3,221,538 parameters."""
    return he_init(LRASPPMobileNetV3(num_classes)), images(batch, res)
