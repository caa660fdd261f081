"""ConvBNAct: the BatchNorm after a dense, pointwise or grouped conv folded into it, the activation run in place,
and patch's ConvKind that puts it in."""
import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import mbkernels
from mbkernels.nn import ConvBNAct
from mbkernels.match import randomize_batchnorm
from conftest import LAYOUTS, assert_close_to_reference, random_x
from oracle import stock_activation

CONVS = {
    "pointwise": dict(in_channels=24, out_channels=40, kernel_size=1),
    "stem-3x3-s2": dict(in_channels=3, out_channels=16, kernel_size=3, stride=2, padding=1),
    "grouped-5x5": dict(in_channels=12, out_channels=18, kernel_size=5, padding=2, groups=3),
    "same-even-kernel": dict(in_channels=6, out_channels=10, kernel_size=4, padding="same"),
    "dilated-with-bias": dict(in_channels=8, out_channels=8, kernel_size=3, padding=2, dilation=2, bias=True),
    "rectangular-s2x1": dict(in_channels=5, out_channels=7, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0)),
}
ACTIVATIONS = ("identity", "relu", "relu6", "hardswish", "silu", "gelu", "leaky_relu:0.2")


def stock_run(conv_kwargs: dict, activation: str) -> nn.Sequential:
    conv = nn.Conv2d(**{"bias": False, **conv_kwargs})
    run = nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), stock_activation(activation)).eval()
    return randomize_batchnorm(run, torch.Generator().manual_seed(3))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("conv_kwargs", CONVS.values(), ids=CONVS.keys())
def test_matches_the_float64_stock_run(conv_kwargs, activation, layout):
    stock = stock_run(conv_kwargs, activation)
    fused = ConvBNAct(*copy.deepcopy(stock)).eval()
    x = random_x((2, conv_kwargs["in_channels"], 11, 10), layout=layout, device="cpu")
    before = x.clone()
    with torch.no_grad():
        got = fused(x)
        want = copy.deepcopy(stock).double()(x.double())
    assert_close_to_reference(got, want, torch.float32)
    assert torch.equal(x, before), "the in-place activation wrote into the input"
    assert got.is_contiguous(memory_format=LAYOUTS[layout])


def test_tf_same_padding_conv_is_folded_at_odd_and_even_sizes():
    conv = timm.layers.create_conv2d(4, 6, 3, stride=2, padding="same")  # timm's Conv2dSame for stride 2
    assert type(conv).__name__ == "Conv2dSame"
    stock = randomize_batchnorm(nn.Sequential(conv, nn.BatchNorm2d(6), nn.SiLU()).eval())
    fused = ConvBNAct(*copy.deepcopy(stock)).eval()
    for size in (9, 10):
        x = random_x((1, 4, size, size), device="cpu")
        with torch.no_grad():
            assert_close_to_reference(fused(x), copy.deepcopy(stock).double()(x.double()), torch.float32)


def test_folded_weights_follow_the_model_dtype_and_load_state_dict():
    stock = stock_run(CONVS["pointwise"], "relu")
    fused = ConvBNAct(*copy.deepcopy(stock)).eval()
    assert fused.folded_weight.dtype == torch.float32
    fused.to(torch.bfloat16)
    assert fused.folded_weight.dtype == fused.folded_bias.dtype == torch.bfloat16
    fused.float()
    other = stock_run(CONVS["pointwise"], "relu")
    randomize_batchnorm(other, torch.Generator().manual_seed(9))
    fused.conv.load_state_dict(other[0].state_dict())
    fused.bn.load_state_dict(other[1].state_dict())
    x = random_x((2, 24, 5, 5), device="cpu")
    with torch.no_grad():
        assert_close_to_reference(fused(x), copy.deepcopy(other).double()(x.double()), torch.float32)


def test_training_and_autograd_run_the_stock_modules():
    stock = stock_run(CONVS["stem-3x3-s2"], "hardswish")
    fused = ConvBNAct(*stock)
    x = random_x((2, 3, 8, 8), device="cpu").requires_grad_()
    fused(x).sum().backward()  # eval mode, but autograd needs a graph: the stock modules run
    assert x.grad is not None and fused.conv.weight.grad is not None


def test_refuses_what_it_cannot_fold():
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        ConvBNAct(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="expected an nn.Conv2d"):
        ConvBNAct(nn.Linear(3, 4), None)


MODELS = {
    "timm:mobilenetv3_large_100": lambda: timm.create_model("mobilenetv3_large_100"),
    "timm:efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
    "tv:mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "tv:mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
}


def _convs_followed_by_batchnorm(model: nn.Module) -> int:
    """Non-depthwise convs whose next module in their parent is a BatchNorm2d (counted independently of patch)."""
    found = 0
    for parent in model.modules():
        children = list(parent.children())
        for conv, following in zip(children, children[1:]):
            depthwise = isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels > 1
            found += isinstance(conv, nn.Conv2d) and not depthwise and isinstance(following, nn.BatchNorm2d)
    return found


@pytest.mark.parametrize("name", MODELS)
def test_patch_folds_every_conv_with_a_batchnorm_and_keeps_the_outputs(name):
    torch.manual_seed(0)
    stock = randomize_batchnorm(MODELS[name]().eval(), torch.Generator().manual_seed(0))
    patched = mbkernels.patch(copy.deepcopy(stock), blocks=False)
    folded = [m for m in patched.modules() if type(m) is ConvBNAct]
    report = mbkernels.patch_report(patched, blocks=False)
    assert len(folded) == report.count("conv_bn_act") == _convs_followed_by_batchnorm(stock) > 0
    assert list(patched.state_dict()) == list(stock.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = copy.deepcopy(stock).double()(x.double())
        error = ((patched(x).double() - want).abs().max() / want.abs().max()).item()
    assert error < 1e-5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in mbkernels.unpatch(patched).modules()) == \
        sum(isinstance(m, nn.BatchNorm2d) for m in stock.modules())


def test_convs_off_leaves_them_alone():
    model = torchvision.models.mobilenet_v2().eval()
    mbkernels.patch(model, blocks=False, convs=False)
    assert not any(type(m) is ConvBNAct for m in model.modules())
