"""Downstream networks built on a MobileNetV3 backbone (torchvision's LRASPP and DeepLabV3 segmentation, SSDLite
detection): every depthwise conv is taken over, and the outputs (the segmentation maps; the detection head's box
regressions and class logits, before NMS orders them) stay as close to the float64 stock network as float32 allows
(or as the float32 stock network's own error, where the network amplifies rounding)."""
import copy

import pytest
import torch
from torch import nn

import mbkernels
from mbkernels.match import randomize_batchnorm
from conftest import TOLERANCE

detection = pytest.importorskip("torchvision.models.detection")
segmentation = pytest.importorskip("torchvision.models.segmentation")


def ssdlite_head(model: nn.Module):
    """The detector's raw outputs on an image batch (the head's box regressions and class logits)."""
    def run(x):
        return model.head(list(model.backbone(x).values()))
    return run


def segmentation_map(model: nn.Module):
    return lambda x: model(x)["out"]


# name -> (builder, what to compare, image side)
NETWORKS = {
    "lraspp": (lambda: segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None),
               segmentation_map, 224),
    "deeplabv3": (lambda: segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                    aux_loss=False), segmentation_map, 224),
    "ssdlite": (lambda: detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None),
                ssdlite_head, 320),
}


def depthwise_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in model.modules())


def relative_error(got, want) -> float:
    if isinstance(want, dict):
        return max(relative_error(got[key], want[key]) for key in want)
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("name", NETWORKS)
def test_the_backbone_is_taken_over_and_the_outputs_stay(name):
    build, outputs, side = NETWORKS[name]
    torch.manual_seed(0)
    stock = randomize_batchnorm(build(), torch.Generator().manual_seed(0)).eval()
    model = mbkernels.patch(copy.deepcopy(stock))
    report = mbkernels.patch_report(model)
    assert report.count("dwconv_bn_act") + report.count("inverted_residual") == depthwise_convs(stock) > 10
    assert not [entry for entry in report.skipped if entry.kind == "dwconv_bn_act"]
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = outputs(copy.deepcopy(stock).double())(x.double())
        stock_error = relative_error(outputs(stock)(x), want)
        assert relative_error(outputs(model)(x), want) <= max(TOLERANCE[torch.float32], 2 * stock_error)
