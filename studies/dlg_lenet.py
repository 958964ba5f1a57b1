"""DLG's LeNet (Zhu et al., NeurIPS 2019; iDLG, Zhao et al., 2020, attack the same), as
those papers' code writes it: three 5x5 convolutions of 12 channels with bias and sigmoid,
then one linear layer. Their weights are drawn uniform(-0.5, 0.5): run it with
--init uniform:0.5. `hybrid.py --model studies/dlg_lenet.py:lenet_mnist` reads it with
torch.fx, as any researcher's own module is read (docs/usage.md, "Your own nn.Module")."""
import torch.nn as nn


class LeNet(nn.Module):
    def __init__(self, channel: int = 3, hidden: int = 768, num_classes: int = 10):
        super().__init__()
        act = nn.Sigmoid
        self.body = nn.Sequential(
            nn.Conv2d(channel, 12, kernel_size=5, padding=5 // 2, stride=2), act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=5 // 2, stride=2), act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=5 // 2, stride=1), act())
        self.fc = nn.Sequential(nn.Linear(hidden, num_classes))

    def forward(self, x):
        out = self.body(x)
        out = out.view(out.size(0), -1)
        return self.fc(out)


def lenet_mnist() -> LeNet:
    """On MNIST's 1x28x28: 12 x 7 x 7 = 588 inputs to the linear layer, 10 classes."""
    return LeNet(channel=1, hidden=588, num_classes=10)


def lenet_cifar100() -> LeNet:
    """On CIFAR-100's 3x32x32: 12 x 8 x 8 = 768 inputs to the linear layer, 100 classes."""
    return LeNet(channel=3, hidden=768, num_classes=100)
