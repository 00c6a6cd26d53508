"""The convolutional, video and segmentation zoo: small instances run to the right shapes, and full-size
instances have exactly the published parameter counts (torchvision's model documentation)."""

from __future__ import annotations

import pytest
import torch

import models
from models import ModelSpecError, build, build_small

# name -> output shape of the small instance (batch 1; res 32, inception 75; video 4 or 8 frames of 32x32)
SMALL_OUTPUT_SHAPES = {
    "resnet50": (1, 1000),
    "resnext50_32x4d": (1, 1000),
    "densenet121": (1, 1000),
    "vgg16": (1, 1000),
    "mobilenet_v2": (1, 1000),
    "inception_v3": (1, 1000),
    "unet": (1, 2, 32, 32),
    "r2plus1d_18": (1, 400),
    "s3d": (1, 400),
    "fcn_resnet50": (1, 21, 32, 32),
    "deeplabv3_resnet50": (1, 21, 32, 32),
    "lraspp_mobilenet_v3_large": (1, 21, 32, 32),
}

FAMILIES = {"cnn": ["resnet50", "resnext50_32x4d", "densenet121", "vgg16", "mobilenet_v2", "inception_v3", "unet"],
            "video": ["r2plus1d_18", "s3d"],
            "segmentation": ["fcn_resnet50", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large"]}


def unet_parameter_count(in_channels: int, num_classes: int, base: int, depth: int, batch_norm: bool) -> int:
    """Closed form for U-Net: a 3x3 conv has 9*cin*cout weights plus cout biases (or 2*cout BN affine
    parameters instead when batch_norm); a 2x2 transposed conv w -> w/2 has 4*w*w/2 + w/2; the head 1x1 conv
    has base*classes + classes."""
    def conv3(cin: int, cout: int) -> int:
        return 9 * cin * cout + (2 * cout if batch_norm else cout)

    widths = [base * 2**i for i in range(depth + 1)]
    total = sum(conv3(cin, w) + conv3(w, w) for cin, w in zip([in_channels, *widths[:-1]], widths))
    total += sum(4 * w * (w // 2) + w // 2 + conv3(w, w // 2) + conv3(w // 2, w // 2) for w in widths[1:])
    return total + base * num_classes + num_classes


# (name, architecture parameters, published count). The without-aux segmentation counts are the published
# with-aux ones minus the aux FCN head (9*1024*256 + 2*256 + 256*21 + 21 = 2,365,205), as torchvision gives.
PUBLISHED_COUNTS = [
    ("resnet50", {}, 25_557_032),
    ("resnext50_32x4d", {}, 25_028_904),
    ("densenet121", {}, 7_978_856),
    ("vgg16", {}, 138_357_544),
    ("mobilenet_v2", {}, 3_504_872),
    ("inception_v3", {"aux_logits": True}, 27_161_264),
    ("inception_v3", {}, 23_834_568),
    ("r2plus1d_18", {}, 31_505_325),
    ("s3d", {}, 8_320_048),
    ("fcn_resnet50", {"aux": True}, 35_322_218),
    ("fcn_resnet50", {}, 35_322_218 - 2_365_205),
    ("deeplabv3_resnet50", {"aux": True}, 42_004_074),
    ("deeplabv3_resnet50", {}, 42_004_074 - 2_365_205),
    ("lraspp_mobilenet_v3_large", {}, 3_221_538),
    # Ronneberger et al.'s network (1 in-channel, 2 classes, no batch norm) with padding=1 convs;
    # padding does not change the parameters: 31,030,658 by unet_parameter_count(1, 2, 64, 4, False)
    ("unet", {}, 31_030_658),
    # the often-quoted 31,037,698 is the batch-norm variant (bias-free convs) on 3 in-channels
    ("unet", {"batch_norm": True, "in_channels": 3}, 31_037_698),
]


def test_names_lists_every_model_in_its_family():
    for family, expected in FAMILIES.items():
        assert set(expected) <= set(models.names(family))
    assert set(SMALL_OUTPUT_SHAPES) <= set(models.names())


@pytest.mark.parametrize("name", sorted(SMALL_OUTPUT_SHAPES))
def test_small_instance_runs_to_expected_shape(name):
    module, inputs = build_small(name)
    assert not module.training
    with torch.no_grad():
        out = module(*inputs)
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == SMALL_OUTPUT_SHAPES[name]
    assert torch.isfinite(out).all()
    assert out.std() > 0  # random init reaches the output: not a dead (all-zero or constant) network


@pytest.mark.parametrize(("name", "params", "count"), PUBLISHED_COUNTS,
                         ids=[f"{n}-{'-'.join(p) or 'default'}" for n, p, _ in PUBLISHED_COUNTS])
def test_full_size_parameter_count_is_published(name, params, count):
    with torch.device("meta"):  # shapes without allocating or drawing 138M random numbers
        module, inputs = build(name, **params)
    assert sum(p.numel() for p in module.parameters()) == count


def test_unet_closed_form_matches_published_and_other_sizes():
    assert unet_parameter_count(1, 2, 64, 4, False) == 31_030_658
    assert unet_parameter_count(3, 2, 64, 4, True) == 31_037_698
    with torch.device("meta"):
        module, _ = build("unet", base_width=16, depth=3, in_channels=3, num_classes=5, batch_norm=True)
    assert sum(p.numel() for p in module.parameters()) == unet_parameter_count(3, 5, 16, 3, True)


def test_full_size_example_inputs_are_the_published_resolutions():
    with torch.device("meta"):
        shapes = {name: tuple(build(name)[1][0].shape) for name in ("resnet50", "inception_v3", "unet",
                                                                    "r2plus1d_18", "s3d", "fcn_resnet50")}
    assert shapes == {"resnet50": (1, 3, 224, 224), "inception_v3": (1, 3, 299, 299), "unet": (1, 1, 512, 512),
                      "r2plus1d_18": (1, 3, 16, 112, 112), "s3d": (1, 3, 16, 224, 224),
                      "fcn_resnet50": (1, 3, 520, 520)}


def test_s3d_final_pool_is_published_window_at_full_size_and_clipped_when_small():
    with torch.device("meta"):
        full, _ = build("s3d")
    small, _ = build_small("s3d")
    assert full.avgpool.kernel_size == (2, 7, 7)
    assert small.avgpool.kernel_size == (1, 1, 1)


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_segmentation_aux_head_returns_main_and_aux_at_input_size(name):
    module, inputs = build_small(name, aux=True)
    plain, _ = build_small(name)
    missing, unexpected = module.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("aux_head.") for key in missing)
    with torch.no_grad():
        out, aux = module(*inputs)
        main_only = plain(*inputs)
    assert tuple(out.shape) == tuple(aux.shape) == (1, 21, 32, 32)
    assert torch.equal(out, main_only)  # the aux head is a side branch: the main output is unchanged


def test_builds_are_deterministic():
    first_module, first_inputs = build_small("mobilenet_v2")
    second_module, second_inputs = build_small("mobilenet_v2")
    with torch.no_grad():
        assert torch.equal(first_module(*first_inputs), second_module(*second_inputs))


@pytest.mark.parametrize(("name", "params", "message"), [
    ("unet", {"res": 100}, "res=100 must be a multiple of 2**depth=16"),
    ("inception_v3", {"res": 74}, "needs res >= 75"),
    ("vgg16", {"res": 16}, "needs res >= 32"),
    ("s3d", {"frames": 4, "res": 32}, "needs frames >= 5, res >= 17"),
])
def test_too_small_inputs_are_refused_with_a_clear_message(name, params, message):
    with pytest.raises(ModelSpecError, match=message.replace("*", r"\*")):
        with torch.device("meta"):
            build(name, **params)
