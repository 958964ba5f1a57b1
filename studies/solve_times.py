"""One step of R-GAP's recursion, this checkout's against an older commit's: for each model,
each convolution's system on one CIFAR-10 test image (the inputs R-GAP passes down here), the
seconds of the older hybrid.py's solve_layer and of this one's, alternated in one process on
one thread, U's shape, both ranks, and the largest difference of the solutions relative to
their largest entry. This checkout's first call per layer also factors M (once per weights
in a process: forward_map), so it is timed cold and then warm.

Usage: python -m studies.solve_times OLD_HYBRID_PY [--models cnn4_c2 ...] [--image 0] > table.md
(OLD_HYBRID_PY: hybrid.py of the older commit, e.g. from `git worktree add`.)
"""
import importlib.util
import sys
import time
from pathlib import Path

import torch

from leakage.data import load_test_split
from leakage.gradients import shared_gradient
from leakage.models import Net
from leakage.modules import build_model
from leakage.paper import FORWARD_MAPS, recursive_reconstruction, solve_layer
from leakage.runtime import configure_torch
from studies.common import Parser, Refused, patched, printed

MODELS = ["cnn2_c2", "cnn3_c1", "cnn4_c2", "cnn4_c3", "cnn6d", "lenet"]


def load_old(path: str):
    """The older hybrid.py as a module of its own, with what it imports from its own folder
    (before the rooms, its report.py and sweeps.py; after, its leakage/, which this
    checkout's would shadow: such a commit is compared by studies/benchmark.sh instead)."""
    if not Path(path).is_file():
        raise Refused(f"{path} is not a file: give the older commit's hybrid.py")
    if (Path(path).parent / "leakage").is_dir():
        raise Refused(f"{path} is of a commit with leakage/: compare it with studies/benchmark.sh")
    spec = importlib.util.spec_from_file_location("hybrid_old", path)
    module = sys.modules["hybrid_old"] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    sys.path.insert(0, str(Path(path).resolve().parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def old_step(old, model: Net, layer: int, a_hat: torch.Tensor, dl_da: torch.Tensor,
             grads: list[torch.Tensor]) -> tuple[torch.Tensor, int, tuple]:
    """The older commit's step: its solve_layer where it has one (1a3d1ce on), else what that does."""
    if hasattr(old, "solve_layer"):
        _, x, rank, _, size = old.solve_layer(model, layer, a_hat, dl_da, grads, None)
        return x, rank, size
    U, V = old.layer_system(model, layer, a_hat, dl_da, grads).matrices(model)
    return (*old.solve_min_norm(U, V), tuple(U.shape))


def timed(f, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = f(*args)
    return time.perf_counter() - start, out


def layer_inputs(model: Net, grads: list[torch.Tensor]) -> list[tuple]:
    """(layer, a_hat, dl_da) of each step of R-GAP's recursion, from the top down."""
    steps = []

    def spy(original, model, layer, a_hat, dl_da, grads, known):
        steps.append((layer, a_hat.clone(), dl_da.clone()))
        return original(model, layer, a_hat, dl_da, grads, known)
    with patched("leakage.paper.solve_layer", spy):
        recursive_reconstruction([model], [grads])
    return steps


def rows(old, models: list[str], image: int) -> list[str]:
    picture = load_test_split("cifar10-test", [image], "data", download=False)[0][0]
    out = []
    for name in models:
        model = build_model(name)
        grads = [g.double() for g in shared_gradient(model, picture, "cpu")]
        for layer, a_hat, dl_da in layer_inputs(model, grads):
            FORWARD_MAPS.clear()
            args = (model, layer, a_hat, dl_da, grads, None)
            old_s, (x_old, rank_old, size) = timed(old_step, old, *args[:-1])
            cold_s, _ = timed(solve_layer, *args)
            warm_s, (_, x_new, rank_new, _, _) = timed(solve_layer, *args)
            diff = float((x_new - x_old).abs().max() / x_old.abs().max())
            out.append(f"| {name} | {layer} | {size[0]}x{size[1]} | {rank_old} | {rank_new} | {old_s:.2f} | "
                       f"{cold_s:.2f} | {warm_s:.2f} | {old_s / warm_s:.1f}x | {diff:.1e} |")
            print(out[-1], file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="hybrid.py of the older commit")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--image", type=int, default=0)
    args = parser.parse_args(argv)
    configure_torch("cpu", 1)
    header = ["| model | layer | U | rank, old | rank, new | old (s) | new, cold (s) | new, warm (s) | old / warm "
              "| max difference |", "|---|---|---|---|---|---|---|---|---|---|"]
    return printed("solve_times", lambda: "\n".join(header + rows(load_old(args.old), args.models, args.image)) + "\n")


if __name__ == "__main__":
    sys.exit(main())
