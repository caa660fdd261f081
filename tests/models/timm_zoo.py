"""The timm models the coverage test and scripts/coverage.py survey, how they are built, and the structural
counts (depthwise convs, SE-like modules) made independently of patch's matching."""
import torch
from torch import nn

from mbkernels.nn import FusedModule
from mbkernels.match import randomize_batchnorm

# name -> input size (the smallest that each model's stages take at a few pixels per stage)
MODELS = {
    "mixnet_s": 64, "tf_mixnet_s": 65, "rexnet_100": 64, "mobilenetv3_rw": 64, "fbnetv3_b": 64,
    "tf_mobilenetv3_small_100": 65, "tf_efficientnet_b0": 66, "mobileone_s0": 64, "fastvit_t8": 64,
    "repghostnet_050": 64, "efficientvit_b0": 64, "efficientvit_m0": 128, "hgnetv2_b0": 64, "convnext_atto": 64,
    "edgenext_xx_small": 64, "lcnet_050": 64, "ghostnet_100": 64, "hgnet_tiny": 64, "ese_vovnet19b_dw": 64,
}
REPARAMETERIZED = ("mobileone", "fastvit", "repghost", "repvit")  # measured deployed: after reparameterize_model


def build(name: str) -> nn.Module:
    """timm's `name` in eval mode, random weights and random BatchNorm statistics (no download)."""
    import timm

    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model(name, pretrained=False), torch.Generator().manual_seed(0)).eval()
    if name.startswith(REPARAMETERIZED):
        # The branches fold into one conv with a bias (the random statistics above make those biases non-zero).
        model = randomize_batchnorm(timm.utils.reparameterize_model(model), torch.Generator().manual_seed(1))
    return model


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 and m.out_channels % m.in_channels == 0


def is_se_like(m: nn.Module) -> bool:
    """A module with a gate child and a Linear / 1x1-conv child (SqueezeExcite, SEModule, EseModule...)."""
    children = list(m.children())
    return (any(isinstance(c, (nn.Sigmoid, nn.Hardsigmoid)) or type(c).__name__ in ("HardSigmoid", "Sigmoid")
                for c in children)
            and any(isinstance(c, (nn.Linear, nn.Conv2d)) for c in children))


def taken_over(model: nn.Module) -> tuple[set, set]:
    """(depthwise convs, SE-like modules) that live inside a fused module, as sets of module objects."""
    convs, ses = set(), set()
    for m in model.modules():
        if isinstance(m, FusedModule):
            convs |= {sub for sub in m.modules() if is_depthwise(sub)}
            ses |= {sub for sub in m.modules() if is_se_like(sub)}
    return convs, ses
