"""What R-GAP's residual tells of a client's update taken for a gradient: a random image's 5
local SGD steps (lr 0.01, 0.1 and 1), their update divided by the learning rate, given to
R-GAP's recursion as one image's gradient. Through the weights before the steps, one
gradient makes the topmost convolution's system hold to float rounding (about 1e-7); the
flag (leakage/gradients.py, CONSISTENT) is a relative residual above 1e-5. On cnn2_c1,
cnn3_c1, cnn4_c2 and lenet, with PyTorch's weights and uniform(-0.5, 0.5) ones.

Usage: python -m studies.update_residuals > docs table rows
"""
import copy
import sys

import torch
import torch.nn.functional as F

from leakage.gradients import CONSISTENT
from leakage.models import build_net, draw_uniform
from leakage.paper import recursive_reconstruction
from studies.common import Parser

MODELS, STEPS, RATES = ("cnn2_c1", "cnn3_c1", "cnn4_c2", "lenet"), 5, (0.01, 0.1, 1.0)


def update(net: torch.nn.Module, x: torch.Tensor, label: int, lr: float) -> list[torch.Tensor]:
    """(w_before - w_after) / lr after STEPS SGD steps on (x, label)."""
    client = copy.deepcopy(net)
    for _ in range(STEPS):
        grads = torch.autograd.grad(F.cross_entropy(client(x), torch.tensor([label])), list(client.parameters()))
        with torch.no_grad():
            for p, g in zip(client.parameters(), grads):
                p -= lr * g
    return [(p0 - p1).detach() / lr for p0, p1 in zip(net.parameters(), client.parameters())]


def main(argv: list[str] | None = None) -> int:
    Parser(prog="python -m studies.update_residuals").parse_args(argv)
    print("| model | weights | lr | the topmost system's residual | flagged |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    for name in MODELS:
        for weights in ("PyTorch's", "uniform(-0.5, 0.5)"):
            net = build_net(name)
            if weights != "PyTorch's":
                draw_uniform(net, 0.5, 0)
            x = torch.rand(1, 3, 32, 32) - 0.5
            for lr in RATES:
                ((_, _, residual),) = recursive_reconstruction([net], [update(net, x, 3, lr)])
                top = [r for r in residual if r is not None][-1]
                print(f"| {name} | {weights} | {lr:g} | {top:.1e} | {'yes' if top > CONSISTENT else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
