"""A network of your own, as a backbone for ClassifierModule (examples/custom_backbone.py,
and in YAML: `model.backbone: {class_path: examples.my_nets.SmallConv, init_args: {...}}`
with the checkout on PYTHONPATH).

A backbone maps the *normalised* input, (N, C, H, W) images or (N, F) features, to logits
(N, classes), or to one value (N, 1) for regression; the product adds the normalisation in
front of it and the softmax after it, in training and in the exported graph alike.
"""

from torch import nn


class SmallConv(nn.Module):
    def __init__(self, classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.LazyConv2d(width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(self.features(x))
