"""Convolutional image classifiers and U-Net, layer for layer as torchvision defines them.

Every builder returns ``(module, (images,))`` with ``images`` of shape (batch, in_channels, res, res);
its defaults are the published configuration, so the parameter counts are the published ones
(asserted in tests/test_models_cnn.py):

    resnet50          25,557,032   He et al. 2016 (torchvision's "v1.5": stride in the 3x3 conv)
    resnext50_32x4d   25,028,904   Xie et al. 2017
    densenet121        7,978,856   Huang et al. 2017
    vgg16            138,357,544   Simonyan & Zisserman 2015 (configuration D, no batch norm)
    mobilenet_v2       3,504,872   Sandler et al. 2018
    inception_v3      23,834,568   Szegedy et al. 2016 (27,161,264 with aux_logits=True)
    unet              31,030,658   Ronneberger et al. 2015 (padding=1 convs, 1 in-channel, 2 classes)

Weights are random: convs He-normal over fan-in (so activations stay O(1) through depth, depthwise
convs included), batch norm at identity, linears at torch's default. The shared pieces (`conv_norm_act`,
`Branches`, `ResNet`, `make_divisible`, `he_init`) are reused by models/video.py and
models/segmentation.py. ReLUs are in place, as in torchvision, so captured graphs carry the same
in-place ops that real-world graphs do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.registry import ModelSpecError, register

Built = tuple[nn.Module, tuple[torch.Tensor, ...]]  # what every builder returns


def _same_padding(kernel: int | tuple[int, ...], dilation: int) -> int | tuple[int, ...]:
    if isinstance(kernel, int):
        return (kernel - 1) // 2 * dilation
    return tuple((k - 1) // 2 * dilation for k in kernel)


def conv_norm_act(cin: int, cout: int, kernel: int | tuple[int, ...] = 1, stride: int | tuple[int, ...] = 1,
                  padding: int | tuple[int, ...] | None = None, *, groups: int = 1, dilation: int = 1,
                  act: type[nn.Module] | None = nn.ReLU, eps: float = 1e-5, momentum: float = 0.1,
                  dims: int = 2) -> nn.Sequential:
    """Bias-free conv, batch norm, optional activation; padding defaults to 'same' for odd kernels."""
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    pad = _same_padding(kernel, dilation) if padding is None else padding
    layers: list[nn.Module] = [conv(cin, cout, kernel, stride, pad, dilation=dilation, groups=groups, bias=False),
                               norm(cout, eps=eps, momentum=momentum)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class Branches(nn.Module):
    """Parallel branches on one input, outputs concatenated along channels (Inception-style)."""

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of divisor, never more than 10% below (MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def he_init(module: nn.Module) -> nn.Module:
    """Random init that keeps activations O(1) in eval mode: He-normal convs over fan-in."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module  # linears keep torch's default init: re-drawing VGG's 120M weights would double its build time


def images(batch: int, res: int, channels: int = 3) -> tuple[torch.Tensor]:
    return (torch.randn(batch, channels, res, res),)


def check_res(model: str, res: int, minimum: int) -> None:
    if res < minimum:
        raise ModelSpecError(f"model {model!r}: res={res} is too small; it needs res >= {minimum}")


# --- ResNet / ResNeXt ------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped, strided, dilated), 1x1 expand x4, plus the (projected) identity."""

    def __init__(self, cin: int, planes: int, stride: int, groups: int, base_width: int, dilation: int) -> None:
        super().__init__()
        width, cout = int(planes * base_width / 64) * groups, planes * 4
        self.conv1 = conv_norm_act(cin, width, 1)
        self.conv2 = conv_norm_act(width, width, 3, stride, groups=groups, dilation=dilation)
        self.conv3 = conv_norm_act(width, cout, 1, act=None)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = conv_norm_act(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(self.conv1(x)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet; num_classes=None drops pooling and classifier (a segmentation backbone).

    dilate[i] replaces the stride of stage i+2 by dilation, as torchvision's replace_stride_with_dilation.
    """

    def __init__(self, blocks: Sequence[int] = (3, 4, 6, 3), *, groups: int = 1, width_per_group: int = 64,
                 num_classes: int | None = 1000, dilate: Sequence[bool] = (False, False, False)) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_norm_act(3, 64, 7, 2, 3), nn.MaxPool2d(3, 2, 1))
        cin, dilation, stages = 64, 1, []
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride, first_dilation = (1 if i == 0 else 2), dilation
            if i > 0 and dilate[i - 1]:
                dilation, stride = dilation * stride, 1
            layers = []
            for j in range(count):
                layers.append(Bottleneck(cin, planes, stride if j == 0 else 1, groups, width_per_group,
                                         first_dilation if j == 0 else dilation))
                cin = planes * 4
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.head = None if num_classes is None else nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(cin, num_classes))

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The outputs of stage 3 (1024 channels) and stage 4 (2048 channels)."""
        c3 = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return c3, self.layer4(c3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise ValueError("this ResNet has no classifier (num_classes=None); call .stages(x)")
        return self.head(self.stages(x)[1])


@register("resnet50", small={"batch": 1, "res": 32}, family="cnn")
def resnet50(batch: int = 1, res: int = 224, num_classes: int = 1000) -> Built:
    """ResNet-50 (He et al. 2016), torchvision v1.5: 25,557,032 parameters."""
    return he_init(ResNet((3, 4, 6, 3), num_classes=num_classes)), images(batch, res)


@register("resnext50_32x4d", small={"batch": 1, "res": 32}, family="cnn")
def resnext50_32x4d(batch: int = 1, res: int = 224, num_classes: int = 1000) -> Built:
    """ResNeXt-50 32x4d (Xie et al. 2017): 25,028,904 parameters."""
    model = ResNet((3, 4, 6, 3), groups=32, width_per_group=4, num_classes=num_classes)
    return he_init(model), images(batch, res)


# --- DenseNet --------------------------------------------------------------------------------------

class DenseBlock(nn.Module):
    """Each layer (BN-ReLU-1x1-BN-ReLU-3x3) reads the concatenation of all earlier feature maps."""

    def __init__(self, cin: int, count: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, bn_size * growth, 1, bias=False),
                          nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True),
                          nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False))
            for c in range(cin, cin + count * growth, growth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, blocks: Sequence[int] = (6, 12, 24, 16), growth: int = 32, stem: int = 64,
                 bn_size: int = 4, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem),
                                   nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        c = stem
        for i, count in enumerate(blocks):
            layers.append(DenseBlock(c, count, growth, bn_size))
            c += count * growth
            if i < len(blocks) - 1:  # transition: halve channels and resolution
                layers += [nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False),
                                         nn.AvgPool2d(2, 2))]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register("densenet121", small={"batch": 1, "res": 32}, family="cnn")
def densenet121(batch: int = 1, res: int = 224, num_classes: int = 1000) -> Built:
    """DenseNet-121 (Huang et al. 2017), growth 32, blocks 6-12-24-16: 7,978,856 parameters."""
    check_res("densenet121", res, 32)
    return he_init(DenseNet(num_classes=num_classes)), images(batch, res)


# --- VGG -------------------------------------------------------------------------------------------

VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, layers: Sequence[int | str] = VGG16_LAYERS, num_classes: int = 1000,
                 hidden: int = 4096, dropout: float = 0.5) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        c = 3
        for item in layers:
            if item == "M":
                modules.append(nn.MaxPool2d(2, 2))
            else:
                modules += [nn.Conv2d(c, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                c = int(item)
        self.features = nn.Sequential(*modules)
        self.avgpool = nn.AdaptiveAvgPool2d(7)  # fixes the classifier input at 512x7x7 for any res
        self.classifier = nn.Sequential(
            nn.Flatten(1), nn.Linear(c * 49, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


# small narrows the classifier: drawing the 120M random weights of the 4096-wide one takes ~2 s; it keeps
# res=224 because the TorchScript ONNX exporter handles the adaptive 7x7 pool only when 7 divides the
# feature map (res a multiple of 224: at 32, 64 and 112 the export fails)
@register("vgg16", small={"batch": 1, "res": 224, "hidden": 256}, family="cnn")
def vgg16(batch: int = 1, res: int = 224, num_classes: int = 1000, hidden: int = 4096) -> Built:
    """VGG-16 (Simonyan & Zisserman 2015), configuration D: 138,357,544 parameters."""
    check_res("vgg16", res, 32)
    return he_init(VGG(num_classes=num_classes, hidden=hidden)), images(batch, res)


# --- MobileNetV2 -----------------------------------------------------------------------------------

class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), linear 1x1 project, residual if shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = round(cin * expand)
        layers = [conv_norm_act(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_norm_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   conv_norm_act(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


# (expansion t, channels c, repeats n, first stride s), Sandler et al. 2018, Table 2
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        c = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_norm_act(3, c, 3, 2, act=nn.ReLU6)]
        for t, channels, n, s in MOBILENET_V2_STAGES:
            cout = make_divisible(channels * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
                c = cout
        layers.append(conv_norm_act(c, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(dropout),
                                  nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register("mobilenet_v2", small={"batch": 1, "res": 32}, family="cnn")
def mobilenet_v2(batch: int = 1, res: int = 224, num_classes: int = 1000, width_mult: float = 1.0) -> Built:
    """MobileNetV2 (Sandler et al. 2018), width 1.0: 3,504,872 parameters."""
    return he_init(MobileNetV2(num_classes, width_mult)), images(batch, res)


# --- Inception v3 ----------------------------------------------------------------------------------

def _bc(cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
        padding: int | tuple[int, int] = 0) -> nn.Sequential:
    """Inception's BasicConv2d: no padding unless asked, batch norm eps 1e-3."""
    return conv_norm_act(cin, cout, kernel, stride, padding, eps=1e-3)


def _seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


def _pool_branch(cin: int, cout: int) -> nn.Sequential:
    return _seq(nn.AvgPool2d(3, 1, 1), _bc(cin, cout, 1))


def _split_1x3_3x1(c: int) -> Branches:
    return Branches(_bc(c, c, (1, 3), padding=(0, 1)), _bc(c, c, (3, 1), padding=(1, 0)))


def inception_a(cin: int, pool: int) -> Branches:  # 35x35 grid
    return Branches(_bc(cin, 64, 1), _seq(_bc(cin, 48, 1), _bc(48, 64, 5, padding=2)),
                    _seq(_bc(cin, 64, 1), _bc(64, 96, 3, padding=1), _bc(96, 96, 3, padding=1)),
                    _pool_branch(cin, pool))


def inception_b(cin: int) -> Branches:  # 35 -> 17 grid reduction
    return Branches(_bc(cin, 384, 3, 2), _seq(_bc(cin, 64, 1), _bc(64, 96, 3, padding=1), _bc(96, 96, 3, 2)),
                    nn.MaxPool2d(3, 2))


def inception_c(cin: int, c7: int) -> Branches:  # 17x17 grid, factorised 7x7
    return Branches(
        _bc(cin, 192, 1),
        _seq(_bc(cin, c7, 1), _bc(c7, c7, (1, 7), padding=(0, 3)), _bc(c7, 192, (7, 1), padding=(3, 0))),
        _seq(_bc(cin, c7, 1), _bc(c7, c7, (7, 1), padding=(3, 0)), _bc(c7, c7, (1, 7), padding=(0, 3)),
             _bc(c7, c7, (7, 1), padding=(3, 0)), _bc(c7, 192, (1, 7), padding=(0, 3))),
        _pool_branch(cin, 192))


def inception_d(cin: int) -> Branches:  # 17 -> 8 grid reduction
    return Branches(_seq(_bc(cin, 192, 1), _bc(192, 320, 3, 2)),
                    _seq(_bc(cin, 192, 1), _bc(192, 192, (1, 7), padding=(0, 3)),
                         _bc(192, 192, (7, 1), padding=(3, 0)), _bc(192, 192, 3, 2)),
                    nn.MaxPool2d(3, 2))


def inception_e(cin: int) -> Branches:  # 8x8 grid, expanded filter bank
    return Branches(_bc(cin, 320, 1), _seq(_bc(cin, 384, 1), _split_1x3_3x1(384)),
                    _seq(_bc(cin, 448, 1), _bc(448, 384, 3, padding=1), _split_1x3_3x1(384)),
                    _pool_branch(cin, 192))


class InceptionV3(nn.Module):
    """Inception v3; the auxiliary classifier (on the 17x17 grid) runs only in training mode."""

    def __init__(self, num_classes: int = 1000, aux_logits: bool = False, dropout: float = 0.5) -> None:
        super().__init__()
        self.stem = _seq(_bc(3, 32, 3, 2), _bc(32, 32, 3), _bc(32, 64, 3, padding=1), nn.MaxPool2d(3, 2),
                         _bc(64, 80, 1), _bc(80, 192, 3), nn.MaxPool2d(3, 2))
        self.mixed_5_6 = _seq(inception_a(192, 32), inception_a(256, 64), inception_a(288, 64), inception_b(288),
                              inception_c(768, 128), inception_c(768, 160), inception_c(768, 160),
                              inception_c(768, 192))
        self.aux = _seq(nn.AvgPool2d(5, 3), _bc(768, 128, 1), _bc(128, 768, 5), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(1), nn.Linear(768, num_classes)) if aux_logits else None
        self.mixed_7 = _seq(inception_d(768), inception_e(1280), inception_e(2048))
        self.head = _seq(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(dropout), nn.Linear(2048, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.mixed_5_6(self.stem(x))
        aux = self.aux(x) if self.aux is not None and self.training else None
        logits = self.head(self.mixed_7(x))
        return logits if aux is None else (logits, aux)


@register("inception_v3", small={"batch": 1, "res": 75}, family="cnn")
def inception_v3(batch: int = 1, res: int = 299, num_classes: int = 1000, aux_logits: bool = False) -> Built:
    """Inception v3 (Szegedy et al. 2016): 23,834,568 parameters (27,161,264 with aux_logits)."""
    check_res("inception_v3", res, 75)  # the smallest input whose 8x8 grid is still >= 1x1
    return he_init(InceptionV3(num_classes, aux_logits)), images(batch, res)


# --- U-Net -----------------------------------------------------------------------------------------

def _double_conv(cin: int, cout: int, batch_norm: bool) -> nn.Sequential:
    if batch_norm:
        return _seq(conv_norm_act(cin, cout, 3), conv_norm_act(cout, cout, 3))
    return _seq(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """U-Net: `depth` 2x2 max-pool downsamplings, each level two 3x3 convs doubling the width;
    2x2 transposed-conv upsampling halving it, concatenated with the skip; a 1x1 conv to classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_width: int = 64, depth: int = 4,
                 batch_norm: bool = False) -> None:
        super().__init__()
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList(_double_conv(cin, w, batch_norm)
                                  for cin, w in zip([in_channels, *widths[:-1]], widths))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(nn.ConvTranspose2d(w, w // 2, 2, 2) for w in reversed(widths[1:]))
        self.up_conv = nn.ModuleList(_double_conv(w, w // 2, batch_norm) for w in reversed(widths[1:]))
        self.head = nn.Conv2d(base_width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()  # the bottleneck output is not a skip connection
        for up, conv in zip(self.up, self.up_conv):
            x = conv(torch.cat([skips.pop(), up(x)], 1))
        return self.head(x)


@register("unet", small={"batch": 1, "res": 32, "base_width": 16}, family="cnn")
def unet(batch: int = 1, res: int = 512, in_channels: int = 1, num_classes: int = 2, base_width: int = 64,
         depth: int = 4, batch_norm: bool = False) -> Built:
    """U-Net (Ronneberger et al. 2015), widths 64..1024 with padding=1 convs: 31,030,658 parameters."""
    if depth < 1 or base_width < 1 or res % 2**depth:
        raise ModelSpecError(f"model 'unet': res={res} must be a multiple of 2**depth={2**depth} "
                             f"(depth >= 1, base_width >= 1)")
    model = UNet(in_channels, num_classes, base_width, depth, batch_norm)
    return he_init(model), images(batch, res, in_channels)
