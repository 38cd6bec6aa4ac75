"""The classic reference networks, written from the papers' description, with the key names
and habits (align_corners=True, pad-in-Up) of the widely used PyTorch implementations.
Used only to check that their state_dicts import into segpipe's models unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RefDoubleConv(nn.Module):
    def __init__(self, cin, cout, mid=None):
        super().__init__()
        mid = mid or cout
        self.double_conv = nn.Sequential(
            nn.Conv2d(cin, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class RefDown(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), RefDoubleConv(cin, cout))

    def forward(self, x):
        return self.maxpool_conv(x)


class RefUp(nn.Module):
    def __init__(self, cin, cout, bilinear):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = RefDoubleConv(cin, cout, cin // 2)
        else:
            self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
            self.conv = RefDoubleConv(cin, cout)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        dy, dx = x2.shape[2] - x1.shape[2], x2.shape[3] - x1.shape[3]
        x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class RefUNet(nn.Module):
    def __init__(self, n_channels, n_classes, f=(64, 128, 256, 512, 1024), bilinear=False):
        super().__init__()
        k = 2 if bilinear else 1
        self.inc = RefDoubleConv(n_channels, f[0])
        self.down1, self.down2, self.down3 = RefDown(f[0], f[1]), RefDown(f[1], f[2]), RefDown(f[2], f[3])
        self.down4 = RefDown(f[3], f[4] // k)
        self.up1, self.up2 = RefUp(f[4], f[3] // k, bilinear), RefUp(f[3], f[2] // k, bilinear)
        self.up3, self.up4 = RefUp(f[2], f[1] // k, bilinear), RefUp(f[1], f[0], bilinear)
        self.outc = nn.Sequential()
        self.outc.conv = nn.Conv2d(f[0], n_classes, 1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x = self.up1(self.down4(x4), x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        return self.outc(self.up4(x, x1))


class RefVGGBlock(nn.Module):
    def __init__(self, cin, mid, cout):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 3, padding=1), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, cout, 3, padding=1), nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class RefNestedUNet(nn.Module):
    """Depth 4; X(i,j) named conv{i}_{j}; heads final or final1..final4."""

    def __init__(self, n_classes, n_channels, f=(32, 64, 128, 256, 512), deep_supervision=False):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv0_0 = RefVGGBlock(n_channels, f[0], f[0])
        for i in range(1, 5):
            setattr(self, f"conv{i}_0", RefVGGBlock(f[i - 1], f[i], f[i]))
        for j in range(1, 5):
            for i in range(5 - j):
                setattr(self, f"conv{i}_{j}", RefVGGBlock(f[i] * j + f[i + 1], f[i], f[i]))
        if deep_supervision:
            for k in range(1, 5):
                setattr(self, f"final{k}", nn.Conv2d(f[0], n_classes, 1))
        else:
            self.final = nn.Conv2d(f[0], n_classes, 1)

    def forward(self, x):
        X = {}
        for s in range(5):
            X[s, 0] = getattr(self, f"conv{s}_0")(x if s == 0 else self.pool(X[s - 1, 0]))
            for j in range(1, s + 1):
                i = s - j
                cat = torch.cat([X[i, k] for k in range(j)] + [self.up(X[i + 1, j - 1])], 1)
                X[i, j] = getattr(self, f"conv{i}_{j}")(cat)
        if self.deep_supervision:
            return [getattr(self, f"final{k}")(X[0, k]) for k in range(1, 5)]
        return self.final(X[0, 4])


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial running stats and affine params, so BN is not identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()
