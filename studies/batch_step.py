"""The hybrid's gradient-matching step, one image at a time against several together: per
model and layer, milliseconds per image of one step (J and dJ/dx), as the hybrid runs it
alone (hybrid_objective, autograd's double backward), as batched_objective runs B images
(per-image parameters, unfold and batched products), and as a functorch vmap over J's
functional form would. Each system is built from CIFAR-10 test images' true activations
(the step's cost does not depend on how close x is). One thread, one process.

Usage: python -m studies.batch_step [--models cnn4_c2 ...] [--batch 4] > table.md
"""
import sys
import time

import torch
import torch.nn.functional as F

from leakage.activations import activation_derivative
from leakage.data import PrivateImage
from leakage.models import Net, gradients_from
from leakage.modules import build_model
from leakage.paper import (
    Batch, LayerSystem, batched_objective, client_gradient, hybrid_objective, hybrid_schedule, layer_system
)
from studies.common import STUDY_SETTINGS, Parser, one_thread_test_images, printed

CASES = [("cnn2_c2", 0), ("cnn3_c1", 0), ("cnn3_c1", 1), ("cnn4_c2", 0), ("cnn4_c2", 1), ("cnn4_c3", 0),
         ("cnn4_c3", 1), ("cnn6d", 0), ("cnn6d", 1), ("cnn6d", 3), ("lenet", 0), ("lenet", 1)]
REPEATS = 30


def per_call_ms(f) -> float:
    f()  # warm
    start = time.perf_counter()
    for _ in range(REPEATS):
        f()
    return (time.perf_counter() - start) / REPEATS * 1e3


def parts_at(model: Net, images: list[PrivateImage], layer: int) -> list[tuple]:
    """(system in float32, a start x, the shared gradient of layers l.., the label) per image."""
    out = []
    for image in images:
        grads = client_gradient(model, image.x, image.label)
        a = image.x
        for i in range(layer):
            a = model.acts[i](model.layers[i](a))
        z = model.layers[layer](a).detach().requires_grad_()
        loss = F.cross_entropy(model(model.acts[layer](z), layer + 1), torch.tensor([image.label]))
        dl_da = torch.autograd.grad(loss, z)[0] / activation_derivative(model.acts[layer], z.detach())
        system = layer_system(model, layer, model.acts[layer](z).detach().double(), dl_da.double(), grads)
        out.append((system.to(torch.float32, "cpu"), a.detach(), gradients_from(model, grads, layer), image.label))
    return out


def row(name: str, layer: int, images: list[PrivateImage], batch: int) -> str:
    model = build_model(name)
    parts = parts_at(model, images[:batch], layer)
    *weights, _ = hybrid_schedule(layer, STUDY_SETTINGS)
    weights = tuple(weights)
    system, x, shared, label = parts[0]
    x1 = x.clone().requires_grad_()
    alone = per_call_ms(lambda: torch.autograd.grad(
        hybrid_objective(model, system, x1, shared, torch.tensor([label]), weights), [x1]))

    def batched(n: int) -> float:
        b = Batch.of([model] * n, [p[0] for p in parts[:n]], [p[2] for p in parts[:n]], None,
                       torch.tensor([p[3] for p in parts[:n]]))
        xb = torch.cat([p[1] for p in parts[:n]]).requires_grad_()
        return per_call_ms(lambda: torch.autograd.grad(batched_objective(model, b, xb, weights).sum(), [xb])) / n

    def one(x, z_minus_b, delta, g_w, shared, target):
        s = LayerSystem(layer, z_minus_b[None], delta[None], g_w)
        return hybrid_objective(model, s, x[None], list(shared), target[None], weights, functional=True)
    vmapped = torch.func.vmap(torch.func.grad_and_value(one))
    args = (torch.cat([p[1] for p in parts]), torch.cat([p[0].z_minus_b for p in parts]),
            torch.cat([p[0].delta for p in parts]), torch.stack([p[0].g_w for p in parts]),
            tuple(torch.stack(g) for g in zip(*(p[2] for p in parts))), torch.tensor([p[3] for p in parts]))
    vmap = per_call_ms(lambda: vmapped(*args)) / batch
    one_batched, several = batched(1), batched(batch)
    return (f"| {name} | {layer} | {alone:.2f} | {one_batched:.2f} | {several:.2f} | {vmap:.2f} | "
            f"{alone / several:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.batch_step")
    p.add_argument("--models", nargs="+", default=None, help="only these models' cases")
    p.add_argument("--batch", type=int, default=4, help="B, the images together (default 4)")
    a = p.parse_args(argv)

    def make() -> str:
        images = one_thread_test_images(list(range(a.batch)))
        lines = [f"| model | layer | alone (ms) | batched, B = 1 (ms) | batched, B = {a.batch} (ms per image) | "
                 f"vmap, B = {a.batch} (ms per image) | alone / batched |", "|---|---|---|---|---|---|---|"]
        for name, layer in CASES:
            if a.models is None or name in a.models:
                lines.append(row(name, layer, images, a.batch))
        return "\n".join(lines) + "\n"
    return printed(p.prog, make)


if __name__ == "__main__":
    sys.exit(main())
