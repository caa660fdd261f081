"""efficientnet_pytorch's EfficientNets, whose forwards the dataflow pass captures and rewrites: every depthwise conv
and SE taken over (with its BatchNorm and its shared swish), outputs equal to stock, with TensorFlow 'SAME' fixed at
construction and computed per call, at odd input sizes too."""
import copy

import pytest
import torch
from torch import nn

import mbkernels
from mbkernels.match import randomize_batchnorm

FLOAT32_RTOL = 1e-5
efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")


@pytest.mark.parametrize("image_size, size", [(None, (67, 65)), (224, (224, 224)), (224, (97, 101))],
                         ids=["dynamic-same-odd", "static-same", "static-same-odd"])
def test_efficientnet_pytorch_is_taken_over_whole(image_size, size):
    torch.manual_seed(0)
    stock = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0", image_size=image_size)
    stock = randomize_batchnorm(stock, torch.Generator().manual_seed(0)).eval()
    depthwise = sum(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in stock.modules())
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks=False)
    report = mbkernels.patch_report(model, blocks=False)
    assert report.count("dwconv_bn_act") == depthwise == 16
    assert report.count("squeeze_excite") == 16 and report.skipped == []
    assert all(not entry.note and entry.activation != "identity" for entry in report.fused
               if entry.kind == "dwconv_bn_act")
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = model(x).double(), stock(x).double()
    assert ((got - want).abs().max() / want.abs().max()).item() < FLOAT32_RTOL
