"""Third-party model zoos, written without mbkernels in mind: pytorchcv (its own conv blocks, SE blocks with 1x1
convs, GhostNet's clamp gate, ShuffleNetV2's channel-split units) and geffnet (gen-efficientnet-pytorch, timm's
ancestor). Every depthwise conv and SE is taken over, nothing is refused, and the patched float32 model is within
float32's tolerance of the float64 stock model, or within twice the float32 stock model's own error where the net
amplifies rounding beyond it (deep nets with random BatchNorm statistics do)."""
import copy

import pytest
import torch

import mbkernels
from mbkernels.match import randomize_batchnorm
from conftest import TOLERANCE


def pytorchcv(name):
    return pytest.importorskip("pytorchcv.model_provider").get_model(name, pretrained=False)


def geffnet(name):
    return pytest.importorskip("geffnet").create_model(name, pretrained=False)


# (zoo, model name, depthwise entries in the report (a mixed conv is one), SEs); 224 x 224 images (pytorchcv's
# final pools are fixed 7 x 7).
MODELS = [
    (pytorchcv, "mobilenetv3_small_w1", 11, 9),
    (pytorchcv, "ghostnet", 41, 7),
    (pytorchcv, "shufflenetv2_w1", 19, 0),
    (pytorchcv, "efficientnet_b0b", 16, 16),
    (pytorchcv, "mnasnet_a1", 16, 8),
    (pytorchcv, "mixnet_s", 16, 13),
    (geffnet, "mobilenetv3_rw", 15, 8),
    (geffnet, "tf_efficientnet_b0", 16, 16),
]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("zoo, name, depthwise, ses", MODELS, ids=[f"{z.__name__}-{n}" for z, n, _, _ in MODELS])
def test_every_depthwise_conv_and_se_is_taken_over(zoo, name, depthwise, ses):
    torch.manual_seed(0)
    stock = randomize_batchnorm(zoo(name), torch.Generator().manual_seed(0)).eval()
    model = mbkernels.patch(copy.deepcopy(stock))
    report = mbkernels.patch_report(model)
    # Nothing refused; what still runs stock is reported as such: only BatchNorms after what no kind folds into
    # (mixnet's grouped 1x1 MixConvs, which split channels across several convs).
    refused = [entry for entry in report.skipped if not entry.reason.startswith("runs stock in the patched forward")]
    assert refused == []
    assert all(entry.kind == "conv_bn_act" and entry.path.endswith(".bn") for entry in report.skipped)
    assert bool(report.skipped) == (name == "mixnet_s")
    assert report.count("dwconv_bn_act") + report.count("inverted_residual") == depthwise
    assert report.count("squeeze_excite") + report.count("inverted_residual") >= ses
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = copy.deepcopy(stock).double()(x.double())
        stock_error = relative_error(stock(x), want)
        assert relative_error(model(x), want) <= max(TOLERANCE[torch.float32], 2 * stock_error)
