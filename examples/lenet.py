"""An nn.Module as a researcher writes one: DLG's LeNet (Zhu et al., NeurIPS 2019) on MNIST's
1x28x28, three 5x5 convolutions of 12 channels with sigmoids, then one linear layer. The
README's first screen attacks it: `python hybrid.py --model examples/lenet.py:LeNet ...`."""
import torch.nn as nn


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 12, kernel_size=5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1), nn.Sigmoid())
        self.fc = nn.Linear(12 * 7 * 7, 10)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))
