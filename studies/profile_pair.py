"""Where a study pair's time goes: per model, attack and layer, the seconds spent building
each layer's matrices (U = [M; G]), solving them (the pivoted QR of the minimum-norm
least-squares solution), and in the hybrid's Adam steps, the rest of the attack beside them;
then the whole cell as the sweep runs it (the three attacks sharing their steps), beside
the three run alone. One (model, image) each, the CIFAR-10 study's budget (N0 2500, N 500),
one thread, one process.

Usage: python -m studies.profile_pair [--models cnn2_c2 ...] [--image 0] > table.md
"""
import contextlib
import functools
import sys
import time
from collections import defaultdict

from leakage.attacks import ATTACKS
from leakage.data import PrivateImage
from leakage.experiment import answers
from leakage.modules import build_model
from leakage.paper import client_gradient, rank_deficiency, recover_label
from leakage.runtime import PUBLISHED_SEED, seed_everything
from studies.common import STUDY_SETTINGS, patched, per_model_table

MODELS = ["cnn2_c2", "cnn3_c1", "cnn3_c5", "cnn4_c2", "cnn6d", "lenet"]
PROFILED = ["rgap", "hybrid", "hybrid_free"]
PARTS = {"build": ("conv_matrix", "grad_matrix"), "solve": ("solve_min_norm",), "adam": ("gradient_matching",)}


class Timers(contextlib.ExitStack):
    """Seconds per (part, layer), from wrapping hybrid.py's functions of each part."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[tuple[str, int], float] = defaultdict(float)
        self.layer = -1

    def __enter__(self) -> "Timers":
        super().__enter__()
        for part, functions in PARTS.items():
            for name in functions:
                self.enter_context(patched(f"leakage.paper.{name}", functools.partial(self.timed, part)))
        self.enter_context(patched("leakage.paper.layer_system", self.tracking))
        return self

    def tracking(self, layer_system, model, layer, *args, **kwargs):  # which layer the recursion is at
        self.layer = layer
        return layer_system(model, layer, *args, **kwargs)

    def timed(self, part: str, f, *args, **kwargs):
        start = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            self.seconds[part, args[1][0].layer if part == "adam" else self.layer] += time.perf_counter() - start


def profile(name: str, image: PrivateImage) -> list[str]:
    model = build_model(name)
    grads = client_gradient(model, image.x, image.label)
    label = recover_label(grads)
    lines, alone = [], 0.0
    for attack in PROFILED:
        seed_everything(PUBLISHED_SEED)
        with Timers() as timers:
            start = time.perf_counter()
            ATTACKS[attack].run(model, grads, label, STUDY_SETTINGS)
            total = time.perf_counter() - start
        alone += total
        for layer in sorted({layer for _, layer in timers.seconds}, reverse=True):
            parts = [timers.seconds.get((part, layer), 0.0) for part in PARTS]
            lines.append(f"| {name} | {ATTACKS[attack].shown} | {layer} | "
                         + " | ".join(f"{t:.2f}" for t in parts) + " | |")
        rest = total - sum(timers.seconds.values())
        lines.append(f"| {name} | {ATTACKS[attack].shown} | all | "
                     + " | ".join(f"{sum(t for (p, _), t in timers.seconds.items() if p == part):.2f}"
                                  for part in PARTS) + f" | {rest:.2f} (total {total:.2f}) |")
    start = time.perf_counter()
    list(answers([(model, grads, label)], PROFILED, STUDY_SETTINGS, PUBLISHED_SEED))
    shared = time.perf_counter() - start
    start = time.perf_counter()
    rank_deficiency(model, grads)
    ranks = time.perf_counter() - start
    lines.append(f"| {name} | the cell: three alone {alone:.1f} s, sharing their steps {shared:.1f} s "
                 f"({alone / shared:.2f}x); a rank analysis alone {ranks:.1f} s | | | | | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    header = ["| model | attack | layer | build U (s) | solve (s) | Adam (s) | rest (s) |",
              "|---|---|---|---|---|---|---|"]
    return per_model_table("python -m studies.profile_pair", argv, MODELS, 0, header, profile)


if __name__ == "__main__":
    sys.exit(main())
