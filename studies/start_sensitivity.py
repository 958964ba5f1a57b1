"""How far one float32 ulp at the start of the hybrid's gradient matching moves its PSNR: for
each (model, image), hybrid_free as the study runs it (N0 2500, N 500), then again with one
entry of its first correction's start (the least-squares solution it is handed) moved to the
next float32 up, at each of a few entries. Where this moves the PSNR by more than a change of
code does, that change's difference is the trajectory's sensitivity, not the change.

Usage: python -m studies.start_sensitivity [--models cnn6d] [--images 1-3] [--attack hybrid_free]
       [--entries 0 1000 2000 3000] > table.md
"""
import sys

import torch

from leakage.attacks import ATTACKS
from leakage.data import PrivateImage, load_test_split, parse_image_indices, to_image
from leakage.gradients import shared_gradient
from leakage.metrics import score
from leakage.models import Net
from leakage.modules import build_model
from leakage.runtime import configure_torch, seed_everything
from studies.common import STUDY_SETTINGS, Parser, Refused, patched, printed


def psnr_with_nudge(model: Net, grads: list[torch.Tensor], image: PrivateImage, attack: str,
                    entry: int | None) -> float:
    """The attack's PSNR, its first correction's start nudged up by one float32 ulp at `entry` (None: untouched)."""
    first = [True]

    def nudged(original, models, systems, x_hats, **kwargs):  # the one image's corrections
        if first[0] and entry is not None:
            x = x_hats[0].float().flatten().clone()
            if entry >= x.numel():
                raise Refused(f"entry {entry} is beyond the {x.numel()} entries of layer {systems[0].layer}'s start")
            x[entry] = torch.nextafter(x[entry], torch.tensor(float("inf")))
            x_hats = [x.view_as(x_hats[0])]
        first[0] = False
        return original(models, systems, x_hats, **kwargs)
    with patched("leakage.paper.gradient_matching", nudged):
        seed_everything(10)
        result = ATTACKS[attack].run(model, grads, image.label, STUDY_SETTINGS)
    return score(to_image(image.x), to_image(result.x))["psnr"]


def table(models: list[str], images: list[int], attack: str, entries: list[int]) -> str:
    lines = [f"| model | image | {attack} | " + " | ".join(f"entry {k} + 1 ulp" for k in entries)
             + " | largest move |", "|---|---|---|" + "---|" * (len(entries) + 1)]
    for name in models:
        model = build_model(name)
        for image in load_test_split("cifar10-test", images, "data", download=False)[0]:
            grads = shared_gradient(model, image, "cpu")
            base = psnr_with_nudge(model, grads, image, attack, None)
            moved = [psnr_with_nudge(model, grads, image, attack, k) for k in entries]
            lines.append(f"| {name} | {image.name} | {base:.4f} | " + " | ".join(f"{p:.4f}" for p in moved)
                         + f" | {max(abs(p - base) for p in moved):.4f} dB |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.start_sensitivity")
    p.add_argument("--models", nargs="+", default=["cnn6d"])
    p.add_argument("--images", default="1-3")
    p.add_argument("--attack", default="hybrid_free", choices=["hybrid", "hybrid_free"])
    p.add_argument("--entries", nargs="+", type=int, default=[0, 1000, 2000, 3000])
    a = p.parse_args(argv)
    configure_torch("cpu", 1)
    return printed(p.prog, lambda: table(a.models, parse_image_indices([a.images]), a.attack, a.entries))


if __name__ == "__main__":
    sys.exit(main())
