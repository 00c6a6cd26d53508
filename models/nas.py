"""NAS-found ImageNet networks with their published cell genotypes: NASNet-A Mobile, PNASNet-5
Mobile, AmoebaNet-D and DARTS-V2. Random init; nothing is downloaded.

NASNet, PNASNet and AmoebaNet share one cell model (the one of the TF-slim / TPU reference
code): a cell reads two hidden states, h0 = ReLU-1x1-BN of its input and h1 = the output two
cells back (matched to h0's resolution by a factorized reduction or in channels by a 1x1
conv); five blocks each add two ops applied to earlier states; the states that no block reads
are concatenated along channels. In a stride-2 cell the ops that read h0/h1 have stride 2.
`SlimGenotype` holds one cell as published (operations, hidden-state indices, used flags).
The ImageNet stem is a 3x3/2 conv (VALID) followed by two stride-2 cells at 1/4 and 1/2 of
the base filter count. The auxiliary head and dropout are left out (inference graphs).

DARTS uses its own cell (Liu et al. 2019): two 1x1 preprocessings, four nodes each summing
two ops of earlier nodes, concatenation of the four nodes; three-conv ImageNet stem.

Full-size parameter counts of these definitions (tests compare them with the papers):
  nasnet_a     5,289,978  (NASNet-A Mobile 4@1056, Zoph et al. 2018: 5.3M)
  pnasnet5     5,064,487  (PNASNet-5 Mobile, Liu et al. 2018: 5.1M)
  amoebanet_d 81,137,437  (AmoebaNet-D (18, 208), Huang et al. 2019 GPipe table 1: 82M)
  darts        4,718,752  (DARTS-V2 ImageNet 14 cells C=48, Liu et al. 2019: 4.7M)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import ModelSpecError, register


@dataclass(frozen=True, slots=True)
class SlimGenotype:
    operations: tuple[str, ...]  # 10 ops: (left, right) of blocks 0..4
    hiddenstate_indices: tuple[int, ...]  # 10 state indices: 0 = h0 (this cell's input), 1 = h1, 2+b = block b
    used_hiddenstates: tuple[int, ...]  # 7 flags; states with 0 are concatenated into the cell output


# tensorflow/models research/slim/nets/nasnet/nasnet_utils.py (Zoph et al. 2018, figure 4)
NASNET_A_NORMAL = SlimGenotype(
    ("separable_5x5_2", "separable_3x3_2", "separable_5x5_2", "separable_3x3_2", "avg_pool_3x3", "none",
     "avg_pool_3x3", "avg_pool_3x3", "separable_3x3_2", "none"),
    (0, 1, 1, 1, 0, 1, 1, 1, 0, 0), (1, 0, 0, 0, 0, 0, 0))
NASNET_A_REDUCTION = SlimGenotype(
    ("separable_5x5_2", "separable_7x7_2", "max_pool_3x3", "separable_7x7_2", "avg_pool_3x3", "separable_5x5_2",
     "none", "avg_pool_3x3", "separable_3x3_2", "max_pool_3x3"),
    (0, 1, 0, 1, 0, 1, 3, 2, 2, 0), (1, 1, 1, 0, 0, 0, 0))
# research/slim/nets/nasnet/pnasnet.py (Liu et al. 2018, figure 1): one cell, stride 2 where reducing
PNASNET_5 = SlimGenotype(
    ("separable_5x5_2", "max_pool_3x3", "separable_7x7_2", "max_pool_3x3", "separable_5x5_2", "separable_3x3_2",
     "separable_3x3_2", "max_pool_3x3", "separable_3x3_2", "none"),
    (1, 1, 0, 0, 0, 0, 4, 0, 1, 0), (1, 1, 0, 0, 0, 0, 0))
# tensorflow/tpu models/official/amoeba_net/model_specs.py, 'amoeba_net_d' (the GPipe benchmark network)
AMOEBANET_D_NORMAL = SlimGenotype(
    ("1x1", "max_pool_3x3", "none", "1x7_7x1", "1x1", "1x7_7x1", "max_pool_3x3", "none", "avg_pool_3x3", "1x1"),
    (1, 1, 1, 0, 0, 0, 2, 2, 1, 5), (0, 1, 1, 0, 0, 1, 0))
AMOEBANET_D_REDUCTION = SlimGenotype(
    ("max_pool_2x2", "max_pool_3x3", "none", "3x3", "1x7_7x1", "max_pool_3x3", "none", "max_pool_2x2",
     "avg_pool_3x3", "1x1"),
    (0, 0, 2, 1, 2, 2, 3, 1, 2, 3), (1, 1, 1, 1, 0, 0, 0))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3)


def _relu_conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), _bn(c_out))


def _separable(c_in: int, c_out: int, kernel: int, stride: int, dilation: int = 1) -> list[nn.Module]:
    """Depthwise kxk (stride, dilation) then pointwise 1x1, no biases: one separable convolution."""
    pad = dilation * (kernel // 2)
    return [nn.Conv2d(c_in, c_in, kernel, stride, pad, dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False)]


class FactorizedReduction(nn.Module):
    """Halve the resolution without dropping pixels: two 1x1/2 paths, the second shifted by one pixel."""

    def __init__(self, c_in: int, c_out: int, relu: bool):
        super().__init__()
        self.relu = nn.ReLU() if relu else nn.Identity()
        self.subsample = nn.AvgPool2d(1, stride=2)
        self.path1 = nn.Conv2d(c_in, c_out // 2, 1, bias=False)
        self.path2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, bias=False)  # odd counts: the extra one goes here
        self.bn = _bn(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.path1(self.subsample(x)), self.path2(self.subsample(shifted))], dim=1))


def _slim_op(op: str, c_in: int, filters: int, stride: int) -> nn.Module:
    """One op of a slim cell, as nasnet_utils / amoeba_net network_utils define it."""
    if op.startswith("separable_"):  # 'separable_5x5_2': two stacked ReLU-sepconv-BN, stride on the first
        kernel, repeats = int(op.split("_")[1][0]), int(op.split("_")[2])
        layers: list[nn.Module] = []
        for r in range(repeats):
            layers += [nn.ReLU(), *_separable(c_in if r == 0 else filters, filters, kernel, stride if r == 0 else 1),
                       _bn(filters)]
        return nn.Sequential(*layers)
    if op in ("none", "1x1"):
        if op == "1x1" or stride > 1 or c_in != filters:
            return _relu_conv_bn(c_in, filters, 1, stride)
        return nn.Identity()
    if "pool" in op:
        kernel = int(op[-1])
        if kernel == 3:
            pool: nn.Module = (nn.AvgPool2d(3, stride, 1, count_include_pad=False) if op.startswith("avg")
                               else nn.MaxPool2d(3, stride, 1))
        elif op == "max_pool_2x2" and stride == 2:
            pool = nn.MaxPool2d(2, 2, ceil_mode=True)  # = TF 'SAME' 2x2/2: ceil(n/2)
        else:
            raise ModelSpecError(f"unsupported pooling {op!r} with stride {stride}")
        if c_in == filters:
            return pool
        return nn.Sequential(pool, nn.Conv2d(c_in, filters, 1, bias=False), _bn(filters))
    if op in ("3x3", "1x7_7x1"):  # AmoebaNet convs sit in a 1x1 bottleneck of filters/4 channels
        mid = filters // 4
        if op == "3x3":
            conv: list[nn.Module] = [nn.Conv2d(mid, mid, 3, stride, 1, bias=False)]
        else:
            conv = [nn.Conv2d(mid, mid, (1, 7), (1, stride), (0, 3), bias=False), _bn(mid), nn.ReLU(),
                    nn.Conv2d(mid, mid, (7, 1), (stride, 1), (3, 0), bias=False)]
        return nn.Sequential(*_relu_conv_bn(c_in, mid), nn.ReLU(), *conv, _bn(mid), *_relu_conv_bn(mid, filters))
    raise ModelSpecError(f"unknown cell operation {op!r}")


class SlimCell(nn.Module):
    """A NASNet/PNASNet/AmoebaNet cell. `prev_channels` None: h1 is the raw input (first stem cell);
    `prev_is_larger`: h1 has twice the resolution of the input and is factor-reduced."""

    def __init__(self, genotype: SlimGenotype, c_in: int, prev_channels: int | None, prev_is_larger: bool,
                 filters: int, stride: int):
        super().__init__()
        self.base = _relu_conv_bn(c_in, filters)
        if prev_channels is None:
            self.prev: nn.Module = nn.Identity()
            c_h1 = c_in
        elif prev_is_larger:
            self.prev, c_h1 = FactorizedReduction(prev_channels, filters, relu=True), filters
        elif prev_channels != filters:
            self.prev, c_h1 = _relu_conv_bn(prev_channels, filters), filters
        else:
            self.prev, c_h1 = nn.Identity(), filters
        channels, reduced = [filters, c_h1], [False, False]
        self.blocks = nn.ModuleList()
        self.indices = genotype.hiddenstate_indices
        for i, (op, idx) in enumerate(zip(genotype.operations, genotype.hiddenstate_indices)):
            self.blocks.append(_slim_op(op, channels[idx], filters, stride if idx < 2 else 1))
            if i % 2:
                channels.append(filters)
                reduced.append(stride > 1)
        # states that no block reads are concatenated, after matching the last state's shape
        self.concat = tuple(i for i, used in enumerate(genotype.used_hiddenstates) if not used)
        self.match = nn.ModuleDict()
        for i in self.concat:
            if reduced[i] != reduced[-1]:
                self.match[str(i)] = FactorizedReduction(channels[i], filters, relu=False)
            elif channels[i] != filters:
                self.match[str(i)] = nn.Sequential(nn.Conv2d(channels[i], filters, 1, bias=False), _bn(filters))
        self.out_channels = filters * len(self.concat)

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        states = [self.base(x), self.prev(prev)]
        for b in range(5):
            left, right = self.blocks[2 * b], self.blocks[2 * b + 1]
            states.append(left(states[self.indices[2 * b]]) + right(states[self.indices[2 * b + 1]]))
        outs = [self.match[str(i)](states[i]) if str(i) in self.match else states[i] for i in self.concat]
        return torch.cat(outs, dim=1)


class CellNetwork(nn.Module):
    """Stem conv, cells wired by (input, previous) output indices, ReLU, global pool, classifier."""

    def __init__(self, stem_filters: int, cells: list[tuple[nn.Module, int, int]], c_out: int, classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem_filters, 3, 2, 0, bias=False), _bn(stem_filters))
        self.cells = nn.ModuleList(c for c, _, _ in cells)
        self.wiring = tuple((i, p) for _, i, p in cells)  # indices into [stem, cell 0, cell 1, ...]
        self.classifier = nn.Linear(c_out, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = [self.stem(images)]
        for cell, (i, p) in zip(self.cells, self.wiring):
            outputs.append(cell(outputs[i], outputs[p]))
        return self.classifier(F.relu(outputs[-1]).mean(dim=(2, 3)))


def reduction_cells(cells: int) -> tuple[int, int]:
    """Cell indices before which the resolution halves (slim's calc_reduction_layers with 2 reductions)."""
    return int(cells / 3), int(2 * cells / 3)


def _slim_network(normal: SlimGenotype, reduction: SlimGenotype | None, cells: int, filters: int, classes: int,
                  res: int) -> CellNetwork:
    """Mirror of slim's _build_nasnet_base / _build_pnasnet_base / amoeba_net _build_network_base.
    `reduction` None (PNASNet): the normal cell with stride 2 reduces, and h1 is always two outputs back."""
    if cells < 3:
        raise ModelSpecError(f"cells={cells}: need at least 3 (one per stage)")
    if res < 32:
        raise ModelSpecError(f"res={res}: need at least 32 for five stride-2 steps")
    stem_filters = 32
    # per output: (channels, resolution level); index 0 is the stem conv
    shapes: list[tuple[int, int]] = [(stem_filters, 0)]
    built: list[tuple[nn.Module, int, int]] = []
    cell_outputs: list[int | None] = [None, 0]

    def add(genotype: SlimGenotype, width: int, stride: int, prev: int | None) -> None:
        net = len(shapes) - 1
        c_in, level = shapes[net]
        prev_ch = None if prev is None else shapes[prev][0]
        prev_larger = prev is not None and shapes[prev][1] < level
        cell = SlimCell(genotype, c_in, prev_ch, prev_larger, width, stride)
        built.append((cell, net, net if prev is None else prev))
        shapes.append((cell.out_channels, level + (stride > 1)))
        cell_outputs.append(net + 1)

    stem_cell = reduction or normal
    for s in range(2):
        add(stem_cell, int(filters * 0.25 * 2 ** s), 2, cell_outputs[-2])
    scaling = 1
    reductions = reduction_cells(cells)
    for n in range(cells):
        if n in reductions:
            scaling *= 2
            if reduction is not None:
                add(reduction, filters * scaling, 2, cell_outputs[-2])
        is_strided = reduction is None and n in reductions
        add(normal, filters * scaling, 2 if is_strided else 1, cell_outputs[-2])
    return CellNetwork(stem_filters, built, shapes[-1][0], classes)


@register("nasnet_a", small=dict(batch=2, res=32, cells=3, filters=8, classes=10), family="nas")
def nasnet_a(batch: int = 1, res: int = 224, cells: int = 12, filters: int = 44, classes: int = 1000):
    """NASNet-A Mobile (Zoph et al. 2018), 4@1056: 12 normal cells (4 per stage), 44 base filters."""
    module = _slim_network(NASNET_A_NORMAL, NASNET_A_REDUCTION, cells, filters, classes, res)
    return module, (torch.randn(batch, 3, res, res),)


@register("pnasnet5", small=dict(batch=2, res=32, cells=3, filters=8, classes=10), family="nas")
def pnasnet5(batch: int = 1, res: int = 224, cells: int = 9, filters: int = 54, classes: int = 1000):
    """PNASNet-5 Mobile (Liu et al. 2018): 9 cells (two of them stride 2), 54 base filters."""
    module = _slim_network(PNASNET_5, None, cells, filters, classes, res)
    return module, (torch.randn(batch, 3, res, res),)


@register("amoebanet_d", small=dict(batch=2, res=32, cells=3, filters=16, classes=10), family="nas")
def amoebanet_d(batch: int = 1, res: int = 224, cells: int = 18, filters: int = 208, classes: int = 1000):
    """AmoebaNet-D (L=18, D=208) of GPipe (Huang et al. 2019) table 1: 18 normal cells, 208 base filters."""
    module = _slim_network(AMOEBANET_D_NORMAL, AMOEBANET_D_REDUCTION, cells, filters, classes, res)
    return module, (torch.randn(batch, 3, res, res),)


# ---- DARTS -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DartsGenotype:
    normal: tuple[tuple[str, int], ...]  # (op, input node) pairs, two per intermediate node
    normal_concat: tuple[int, ...]
    reduce: tuple[tuple[str, int], ...]
    reduce_concat: tuple[int, ...]


# quark0/darts cnn/genotypes.py, DARTS_V2 (second-order search; Liu et al. 2019, figure 4)
DARTS_V2 = DartsGenotype(
    normal=(("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)),
    reduce_concat=(2, 3, 4, 5))


class DartsFactorizedReduce(nn.Module):
    """DARTS' reduction: ReLU, two 1x1/2 convs (one on the input shifted by a pixel), concat, BN."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return self.bn(torch.cat([self.conv1(x), self.conv2(x[:, :, 1:, 1:])], dim=1))


def _darts_op(op: str, c: int, stride: int) -> nn.Module:
    if op == "sep_conv_3x3":  # two ReLU-sepconv-BN, the first keeps c channels
        return nn.Sequential(nn.ReLU(), *_separable(c, c, 3, stride), nn.BatchNorm2d(c),
                             nn.ReLU(), *_separable(c, c, 3, 1), nn.BatchNorm2d(c))
    if op == "dil_conv_3x3":
        return nn.Sequential(nn.ReLU(), *_separable(c, c, 3, stride, dilation=2), nn.BatchNorm2d(c))
    if op == "skip_connect":
        return nn.Identity() if stride == 1 else DartsFactorizedReduce(c, c)
    if op == "max_pool_3x3":
        return nn.MaxPool2d(3, stride, 1)
    if op == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride, 1, count_include_pad=False)
    raise ModelSpecError(f"unknown DARTS operation {op!r}")


class DartsCell(nn.Module):
    def __init__(self, genotype: DartsGenotype, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.pre0 = DartsFactorizedReduce(c_pp, c) if reduction_prev else _relu_conv_bn_plain(c_pp, c)
        self.pre1 = _relu_conv_bn_plain(c_p, c)
        edges, self.concat = (genotype.reduce, genotype.reduce_concat) if reduction else (
            genotype.normal, genotype.normal_concat)
        self.ops = nn.ModuleList(_darts_op(op, c, 2 if reduction and src < 2 else 1) for op, src in edges)
        self.sources = tuple(src for _, src in edges)
        self.out_channels = c * len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        for n in range(len(self.ops) // 2):
            states.append(self.ops[2 * n](states[self.sources[2 * n]])
                          + self.ops[2 * n + 1](states[self.sources[2 * n + 1]]))
        return torch.cat([states[i] for i in self.concat], dim=1)


def _relu_conv_bn_plain(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


class DartsImageNet(nn.Module):
    """DARTS' NetworkImageNet without the auxiliary head."""

    def __init__(self, genotype: DartsGenotype, cells: int, c: int, classes: int):
        super().__init__()
        self.stem0 = nn.Sequential(
            nn.Conv2d(3, c // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(),
            nn.Conv2d(c // 2, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c))
        self.stem1 = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c))
        c_pp, c_p, c_cur = c, c, c
        self.cells = nn.ModuleList()
        reduction_prev = True  # stem0 has twice stem1's resolution
        for i in range(cells):
            reduction = i in (cells // 3, 2 * cells // 3)
            c_cur *= 2 if reduction else 1
            cell = DartsCell(genotype, c_pp, c_p, c_cur, reduction, reduction_prev)
            self.cells.append(cell)
            c_pp, c_p, reduction_prev = c_p, cell.out_channels, reduction
        self.classifier = nn.Linear(c_p, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s0 = self.stem0(images)
        s1 = self.stem1(s0)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(s1.mean(dim=(2, 3)))


@register("darts", small=dict(batch=2, res=32, cells=3, filters=8, classes=10), family="nas")
def darts(batch: int = 1, res: int = 224, cells: int = 14, filters: int = 48, classes: int = 1000):
    """DARTS-V2 for ImageNet (Liu et al. 2019): 14 cells, C=48 initial channels; res a multiple of 32."""
    if res % 32 or res < 32:
        raise ModelSpecError(f"res={res}: DARTS' shifted factorized reduction needs a multiple of 32")
    if cells < 3 or filters % 2:
        raise ModelSpecError(f"cells={cells}, filters={filters}: need cells >= 3 and even filters")
    return DartsImageNet(DARTS_V2, cells, filters, classes), (torch.randn(batch, 3, res, res),)
