"""The optimisation attacks' step on a client's batch, timed: one evaluation of DLG's objective
and its gradient (the dummy's gradient of the mean cross-entropy, its squared distance to the
shared one, and the backward through both; an L-BFGS step makes several, a Cosine+TV step one of
the same cost), at B = 1, 4 and 8, on DLG's LeNet and on torchvision's ResNet-18 (eval mode), on
CIFAR-10's shape. A batch of B costs B separate runs' steps times the ratio printed.

Usage: python -m studies.batch_speed [--repeats N] > docs table rows
"""
import sys
import time

import torch
import torch.nn.functional as F

from leakage.matching import dummy_gradient, squared_distance
from leakage.models import build_net, draw_uniform
from leakage.modules import build_model
from studies.common import Parser

MODELS = {"DLG's LeNet": "12k5s2p2b-sigmoid,12k5s2p2b-sigmoid,12k5s1p2b-sigmoid,fc-id",
          "ResNet-18": "torchvision.models:resnet18(num_classes=10)"}
BATCHES = (1, 4, 8)


def step_seconds(model: torch.nn.Module, batch: int, repeats: int) -> float:
    """The median seconds of one objective-and-gradient evaluation on a batch of `batch`."""
    torch.manual_seed(0)
    x = torch.rand(batch, 3, 32, 32) - 0.5
    labels = torch.arange(batch) % 10
    shared = [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(x), labels), list(model.parameters()))]
    dummy = torch.randn_like(x, requires_grad=True)
    times = []
    for _ in range(repeats + 1):  # the first warms up
        start = time.perf_counter()
        loss = squared_distance(dummy_gradient(model, model(dummy), labels), shared)
        torch.autograd.grad(loss, [dummy])
        times.append(time.perf_counter() - start)
    return float(torch.tensor(times[1:]).median())


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.batch_speed")
    p.add_argument("--repeats", type=int, default=10, help="evaluations timed per setting (default 10)")
    a = p.parse_args(argv)
    print("| model | B | seconds a step | per image | a batch of B against B runs of one |")
    print("|---|---|---|---|---|")
    for name, spec in MODELS.items():
        model = build_net(spec) if "," in spec else build_model(spec, mode="eval")
        if "," in spec:
            draw_uniform(model, 0.5, 0)
        one = None
        for batch in BATCHES:
            seconds = step_seconds(model, batch, a.repeats)
            one = seconds if batch == 1 else one
            print(f"| {name} | {batch} | {seconds:.4f} | {seconds / batch:.4f} | {seconds / (batch * one):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
