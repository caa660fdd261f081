"""Hand-written modules whose forward code, not their module tree, does the work: one per pattern the dataflow pass
must take over (and one it must leave alone), with the number of depthwise convs and SEs each holds."""
import torch
import torch.nn.functional as F
from torch import nn


def dw(channels, kernel=3, stride=1, padding=None, bias=False):
    return nn.Conv2d(channels, channels, kernel, stride, kernel // 2 if padding is None else padding,
                     groups=channels, bias=bias)


class FunctionalActivations(nn.Module):
    """BNs and activations applied in forward as functions and expressions."""

    def __init__(self, c=12):
        super().__init__()
        self.conv1, self.bn1 = dw(c), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = dw(c, 5, 2), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = dw(c), nn.BatchNorm2d(c)
        self.conv4 = nn.Conv2d(c, c, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(c)

    def forward(self, x):
        x = F.hardswish(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        x = y * torch.sigmoid(y)  # silu written out
        z = self.bn3(self.conv3(x))
        x = F.relu6(z + 3) / 6 * z  # hardswish written out
        return self.bn4(self.conv4(x)).relu()


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class SharedActivation(nn.Module):
    """One activation module serves every call (efficientnet_pytorch's pattern)."""

    def __init__(self, c=16):
        super().__init__()
        self.expand, self.bn0 = nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c)
        self.depthwise, self.bn1 = dw(2 * c), nn.BatchNorm2d(2 * c)
        self.project, self.bn2 = nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.act = Swish()

    def forward(self, x):
        x = self.act(self.bn0(self.expand(x)))
        x = self.act(self.bn1(self.depthwise(x)))
        return self.bn2(self.project(x))


def paddle_hard_sigmoid(v):
    """PaddlePaddle's hard sigmoid (slope 0.2), as ports of its MobileNetV3 / PP-LCNet write it."""
    return F.relu6(1.2 * v + 3.0) / 6.0


def clamp_gate(v):
    """A gate that clamps to [0, 1] (pytorchcv's GhostNet)."""
    return v.clamp(0.0, 1.0)


class ClampGate(nn.Module):
    def forward(self, x):
        return clamp_gate(x)


class PaddleHardSigmoid(nn.Module):
    def forward(self, x):
        return paddle_hard_sigmoid(x)


class InlineSE(nn.Module):
    """A depthwise run and a squeeze-excite computed inline: pool, two 1x1 convs, a gate, the product."""

    def __init__(self, c=24, reduced=6, gate=torch.sigmoid):
        super().__init__()
        self.conv, self.bn = dw(c), nn.BatchNorm2d(c)
        self.se_reduce = nn.Conv2d(c, reduced, 1)
        self.se_expand = nn.Conv2d(reduced, c, 1)
        self.gate = gate

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.se_expand(F.silu(self.se_reduce(s)))
        return self.gate(s) * x


class ModuleRunInlineSE(nn.Module):
    """A depthwise run of modules called in order (fused by structure) and an SE computed inline from 1x1 convs that
    are children too: only the SE's layers are left for forward code."""

    def __init__(self, c=16, reduced=4):
        super().__init__()
        self.conv, self.bn, self.act = dw(c), nn.BatchNorm2d(c), nn.ReLU()
        self.fc1, self.fc2 = nn.Conv2d(c, reduced, 1), nn.Conv2d(reduced, c, 1)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class LinearSE(nn.Module):
    """An SE with Linear layers and views (x.mean, .view(b, c), [:, :, None, None]), hardsigmoid as an expression."""

    def __init__(self, c=20, reduced=8):
        super().__init__()
        self.conv, self.bn = dw(c, 3, 2), nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Linear(c, reduced), nn.Linear(reduced, c)

    def forward(self, x):
        x = self.bn(self.conv(x)).relu()
        b, c = x.shape[0], x.shape[1]
        s = x.mean((2, 3)).view(b, c)
        s = F.relu6(self.fc2(torch.relu(self.fc1(s))) + 3) / 6
        return x * s[:, :, None, None]


class StaticSameConv(nn.Conv2d):
    """A Conv2d whose forward pads (TensorFlow 'SAME' for a fixed image size) and convolves."""

    def __init__(self, *args, image_size=32, **kwargs):
        super().__init__(*args, **kwargs)
        pads = []
        for k, s in zip(self.kernel_size, self.stride):
            total = max((-(-image_size // s) - 1) * s + k - image_size, 0)
            pads = [total // 2, total - total // 2] + pads
        self.pad = nn.ZeroPad2d(pads)

    def forward(self, x):
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class PadThenConv(nn.Module):
    """Padding applied before the conv three ways: F.pad, a ZeroPad2d module, a Conv2d subclass that pads."""

    def __init__(self, c=16):
        super().__init__()
        self.conv1, self.bn1 = dw(c, 3, 2, padding=0), nn.BatchNorm2d(c)
        self.pad2 = nn.ZeroPad2d((1, 2, 2, 1))
        self.conv2, self.bn2 = dw(c, 4, 1, padding=0), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = StaticSameConv(c, c, 5, 2, groups=c, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(F.pad(x, (0, 1, 0, 1)))))
        x = F.silu(self.bn2(self.conv2(self.pad2(x))))
        return F.hardswish(self.bn3(self.conv3(x)))


class FoldedByTheModel(nn.Module):
    """BatchNorms already folded into the convs (biases, no BN): conv then activation."""

    def __init__(self, c=16):
        super().__init__()
        self.conv1 = dw(c, bias=True)
        self.conv2 = dw(c, 5, 2, bias=True)

    def forward(self, x):
        return F.gelu(self.conv2(F.relu6(self.conv1(x))))


class PythonFlag(nn.Module):
    """A branch on a Python attribute: the graph holds the branch taken."""

    def __init__(self, c=16, use_se=True):
        super().__init__()
        self.use_se = use_se
        self.conv, self.bn = dw(c), nn.BatchNorm2d(c)
        self.reduce, self.expand = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        if self.use_se:
            x = x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x


class Block(nn.Module):
    """A whole inverted-residual block in forward code (expand, depthwise, inline SE, project, residual)."""

    def __init__(self, c=16, expansion=4, stride=1):
        super().__init__()
        e = c * expansion
        self.stride = stride
        self.expand, self.bn0 = nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e)
        self.depthwise, self.bn1 = dw(e, 3, stride), nn.BatchNorm2d(e)
        self.se_reduce, self.se_expand = nn.Conv2d(e, c // 2, 1), nn.Conv2d(c // 2, e, 1)
        self.project, self.bn2 = nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, inputs, drop_rate=None):
        x = F.relu6(self.bn0(self.expand(inputs)))
        x = F.relu6(self.bn1(self.depthwise(x)))
        x = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(x, 1))))) * x
        x = self.bn2(self.project(x))
        if self.stride == 1:
            if drop_rate and self.training:
                x = F.dropout(x, drop_rate)
            x = x + inputs
        return x


class Net(nn.Module):
    """Blocks called with a rate computed in forward (efficientnet_pytorch's drop connect)."""

    def __init__(self, c=16):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.ModuleList([Block(c), Block(c, 2), Block(c, 4)])

    def forward(self, x):
        x = F.silu(self.bn(self.stem(x)))
        for i, block in enumerate(self.blocks):
            x = block(x, drop_rate=0.2 * i / len(self.blocks))
        return x


class StagesBuiltInForward(nn.Module):
    """segmentation_models_pytorch's encoder pattern: the stem's registered modules put in a new nn.Sequential in
    forward, the blocks called with a rate computed there, the features of each stage returned."""

    def __init__(self, c=16):
        super().__init__()
        self.stem, self.bn, self.act = nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU()
        self.blocks = nn.ModuleList([Block(c), Block(c, 2, stride=2)])

    def forward(self, x):
        stages = [nn.Identity(), nn.Sequential(self.stem, self.bn, self.act)]
        features = []
        for stage in stages:
            x = stage(x)
            features.append(x)
        for i, block in enumerate(self.blocks):
            x = block(x, 0.1 * i)
            features.append(x)
        return features[-1] + features[-2].mean() if len(features) > 2 else x


class FeaturesAndAnUnusedHead(nn.Module):
    """A backbone returning its stages' features as a list, with a head conv + BN its forward never calls (as
    segmentation_models_pytorch's encoders keep the classifier's)."""

    def __init__(self, c=16):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = dw(c), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = dw(c, 5, 2), nn.BatchNorm2d(c)
        self.head, self.bn_head = nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        first = F.hardswish(self.bn1(self.conv1(x)))
        return [first, F.hardswish(self.bn2(self.conv2(first)))]


class ChannelSplitUnit(nn.Module):
    """ShuffleNetV2's unit: half the channels pass, the other half go through 1x1, depthwise and 1x1 convs, then
    the halves are concatenated and shuffled. Its convs see half the channels the unit gets."""

    def __init__(self, c=32, functional=False):
        super().__init__()
        half = c // 2
        self.functional = functional
        self.conv1, self.bn1, self.act1 = nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU()
        self.dw, self.bn2 = dw(half), nn.BatchNorm2d(half)
        self.conv2, self.bn3, self.act2 = nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU()

    def forward(self, x):
        passed, y = x.chunk(2, dim=1)
        y = F.relu(self.bn1(self.conv1(y))) if self.functional else self.act1(self.bn1(self.conv1(y)))
        y = self.bn2(self.dw(y))
        y = F.relu(self.bn3(self.conv2(y))) if self.functional else self.act2(self.bn3(self.conv2(y)))
        n, c, h, w = x.shape
        return torch.cat([passed, y], 1).view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class PackageConv2d(nn.Conv2d):
    """A package's own Conv2d subclass (as pytorchcv's, efficientnet_pytorch's), computing what Conv2d does."""


class ShuffleNetUnits(nn.Module):
    def __init__(self, c=32, functional=False, stem=nn.Conv2d):
        super().__init__()
        self.stem, self.bn = stem(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c)
        self.units = nn.Sequential(ChannelSplitUnit(c, functional), ChannelSplitUnit(c, functional))

    def forward(self, x):
        return self.units(F.relu(self.bn(self.stem(x))))


class TensorBranch(nn.Module):
    """A branch on tensor values: its forward cannot be captured, and must be left alone with that reason."""

    def __init__(self, c=16):
        super().__init__()
        self.conv, self.bn = dw(c), nn.BatchNorm2d(c)
        self.reduce, self.expand = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        if x.mean() > 0:
            x = x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x


# name -> (module maker, input channels, depthwise convs, SEs)
FORWARDS = {
    "functional-activations": (FunctionalActivations, 12, 3, 0),
    "shared-activation": (SharedActivation, 16, 1, 0),
    "inline-se": (InlineSE, 24, 1, 1),
    "inline-se-hardsigmoid": (lambda: InlineSE(gate=F.hardsigmoid), 24, 1, 1),
    "inline-se-paddle-gate": (lambda: InlineSE(gate=paddle_hard_sigmoid), 24, 1, 1),
    "inline-se-clamp-gate": (lambda: InlineSE(gate=clamp_gate), 24, 1, 1),
    "linear-se": (LinearSE, 20, 1, 1),
    "module-run-inline-se": (ModuleRunInlineSE, 16, 1, 1),
    "pad-then-conv": (PadThenConv, 16, 3, 0),
    "folded-by-the-model": (FoldedByTheModel, 16, 2, 0),
    "python-flag": (PythonFlag, 16, 1, 1),
    "python-flag-off": (lambda: PythonFlag(use_se=False), 16, 1, 0),
    "net-of-blocks": (Net, 3, 3, 3),
    "stages-built-in-forward": (StagesBuiltInForward, 3, 2, 2),
    "channel-split-units": (ShuffleNetUnits, 3, 2, 0),
    "channel-split-units-functional": (lambda: ShuffleNetUnits(functional=True), 3, 2, 0),
    "channel-split-units-subclassed-stem": (lambda: ShuffleNetUnits(stem=PackageConv2d), 3, 2, 0),
}
