"""MobileNetV3 Small and Large written by hand from the paper (Howard et al. 2019, "Searching for MobileNetV3",
Tables 1 and 2), the way tutorials write it: blocks as nn.Sequential(Conv2d, BatchNorm2d, act), hand-written
h_swish / h_sigmoid, squeeze-excite with nn.Linear layers, and the final 1x1 conv stage followed by an SE.
"""
from torch import nn

# Rows of Tables 1 and 2: kernel, expansion size, output channels, SE, nonlinearity (HS: h-swish, RE: ReLU), stride.
LARGE = [
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
]
SMALL = [
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
]


def make_divisible(value, divisor=8):
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class h_sigmoid(nn.Module):
    def __init__(self, inplace=True):
        super().__init__()
        self.relu = nn.ReLU6(inplace=inplace)

    def forward(self, x):
        return self.relu(x + 3) / 6


class h_swish(nn.Module):
    def __init__(self, inplace=True):
        super().__init__()
        self.sigmoid = h_sigmoid(inplace=inplace)

    def forward(self, x):
        return x * self.sigmoid(x)


class SELayer(nn.Module):
    def __init__(self, channels, reduction=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, make_divisible(channels // reduction)),
            nn.ReLU(inplace=True),
            nn.Linear(make_divisible(channels // reduction), channels),
            h_sigmoid(),
        )

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y


def conv_bn(inp, oup, kernel, stride, act):
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup), act)


class InvertedResidual(nn.Module):
    def __init__(self, inp, hidden_dim, oup, kernel_size, stride, use_se, use_hs):
        super().__init__()
        self.identity = stride == 1 and inp == oup
        act = h_swish() if use_hs else nn.ReLU(inplace=True)
        dw = [
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size, stride, (kernel_size - 1) // 2, groups=hidden_dim,
                      bias=False),
            nn.BatchNorm2d(hidden_dim),
        ]
        se = SELayer(hidden_dim) if use_se else nn.Identity()
        project = [nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        if inp == hidden_dim:
            # dw -> BN -> act -> SE -> pw-linear
            self.conv = nn.Sequential(*dw, act, se, *project)
        else:
            # pw -> BN -> act -> dw -> BN -> SE -> act -> pw-linear (the activation after the SE, as tutorials do)
            self.conv = nn.Sequential(
                nn.Conv2d(inp, hidden_dim, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden_dim),
                h_swish() if use_hs else nn.ReLU(inplace=True),
                *dw, se, act, *project,
            )

    def forward(self, x):
        return x + self.conv(x) if self.identity else self.conv(x)


class MobileNetV3(nn.Module):
    def __init__(self, cfgs, last_conv, last_se, hidden, num_classes=1000, width_mult=1.0):
        super().__init__()
        input_channel = make_divisible(16 * width_mult)
        layers = [conv_bn(3, input_channel, 3, 2, h_swish())]
        for k, exp, c, use_se, nl, s in cfgs:
            output_channel = make_divisible(c * width_mult)
            layers.append(InvertedResidual(input_channel, make_divisible(exp * width_mult), output_channel, k, s,
                                           use_se, nl == "HS"))
            input_channel = output_channel
        self.features = nn.Sequential(*layers)
        exp_size = make_divisible(last_conv * width_mult)
        self.conv = conv_bn(input_channel, exp_size, 1, 1, h_swish())
        self.se = SELayer(exp_size) if last_se else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Linear(exp_size, hidden), h_swish(), nn.Dropout(0.2), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        x = self.features(x)
        x = self.se(self.conv(x))
        x = self.avgpool(x)
        return self.classifier(x.view(x.size(0), -1))


def mobilenetv3_small(**kwargs):
    return MobileNetV3(SMALL, last_conv=576, last_se=True, hidden=1024, **kwargs)


def mobilenetv3_large(**kwargs):
    return MobileNetV3(LARGE, last_conv=960, last_se=True, hidden=1280, **kwargs)
