"""Each R-GAP step of a few models, solved through its certified normal equations
(gram_solution) and through the QR (solve_min_norm on the reduced system): whether the
certificate holds, both ranks, how far apart the solutions are, and each one's seconds. A
wide system, or one the certificate declines, is solved by the QR alone. One thread, one
process; the first normal-equations solve of each layer includes M^T M.

Usage: python -m studies.normal_equations [--models cnn6d ...] [--image 1] > table.md
"""
import sys
import time

from leakage.data import PrivateImage
from leakage.modules import build_model
from leakage.paper import client_gradient, recursive_reconstruction
from leakage.solvers import solve_min_norm
from studies.common import patched, per_model_table

MODELS = ["cnn6d", "cnn4_c3", "lenet", "cnn4_c2", "cnn3_c1"]


def rows(name: str, image: PrivateImage) -> list[str]:
    model = build_model(name)
    grads = client_gradient(model, image.x, image.label)
    lines = []

    def both(gram, system, conv, forward, equations):
        start = time.perf_counter()
        solved = gram(system, conv, forward, equations)
        normal = time.perf_counter() - start
        start = time.perf_counter()
        x, rank = solve_min_norm(*system.reduced_matrices(model, forward), equations)
        qr = time.perf_counter() - start
        shape = f"{equations} x {forward.M.shape[1]}"
        if solved is None:
            lines.append(f"| {name} | {system.layer} | {shape} | declined | {rank} | | | {qr:.2f} |")
        else:
            gap = ((solved[0] - x).norm() / x.norm()).item()
            lines.append(f"| {name} | {system.layer} | {shape} | {solved[1]} | {rank} | {gap:.1e} | {normal:.2f} "
                         f"| {qr:.2f} |")
        return solved
    with patched("leakage.paper.gram_solution", both):
        recursive_reconstruction([model], [grads])
    return lines


def main(argv: list[str] | None = None) -> int:
    header = ["| model | layer | equations x unknowns | rank, normal equations | rank, QR | solutions apart "
              "(relative) | normal equations (s) | QR (s) |", "|---|---|---|---|---|---|---|---|"]
    return per_model_table("python -m studies.normal_equations", argv, MODELS, 1, header, rows)


if __name__ == "__main__":
    sys.exit(main())
