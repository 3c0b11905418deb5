"""The baseline seed 002 compares against: a small CNN of only convolution, pooling and linear layers,
trained from scratch (no pretrained features). Its pooled feature map feeds the same n-furcated head."""

from __future__ import annotations

from torch import nn

# Plain [0, 1] inputs centred at 0.5: the CNN learns its own scale, no ImageNet statistics apply.
CNN_MEAN = (0.5, 0.5, 0.5)
CNN_STD = (0.5, 0.5, 0.5)


class SmallCNN(nn.Module):
    """[conv3x3 -> ReLU -> max-pool 2] per width in `channels`, then average-pool to `pooled_size`^2 and flatten."""

    def __init__(self, channels: list[int], pooled_size: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for width in channels:
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            in_channels = width
        layers += [nn.AdaptiveAvgPool2d(pooled_size), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.feature_dim = in_channels * pooled_size * pooled_size

    def forward(self, images):
        return self.features(images)
