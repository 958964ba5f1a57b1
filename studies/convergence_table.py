"""Tabulates the hybrid's convergence runs (studies/make_convergence.sh): for each model
and iteration budget, the mean ± std (n-1) of PSNR and SSIM over the images, and the mean
seconds per image; then each budget's mean over the models, and what it loses against
the largest budget, image by image.

Usage: python -m studies.convergence_table assets/convergence/N0_*.json > table.md
"""
import sys

import numpy as np

from studies.common import Parser, Refused, printed, read_results


def budget_rows(path: str) -> tuple[tuple[int, int], dict[str, list[dict]]]:
    """(N, N0) of one run and its hybrid entries by model, in image order."""
    run = read_results(path, "hybrid")
    if not all("hybrid" in e.get("attacks", {}) for e in run["runs"]):
        raise Refused(f"{path}: not every (model, image) holds the hybrid's results")
    budget = run["config"]["hybrid_iters"], run["config"]["hybrid_iters_first"]
    by_model: dict[str, list[dict]] = {}
    for row in sorted(run["runs"], key=lambda r: r["image"]):
        by_model.setdefault(row["model"], []).append(row["attacks"]["hybrid"] | {"image": row["image"]})
    return budget, by_model


def mean_std(values: list[float], digits: int) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def table(paths: list[str]) -> str:
    runs = sorted(budget_rows(p) for p in paths)
    if len({tuple(sorted(rows)) for _, rows in runs}) > 1:
        raise Refused("the runs hold different models: one table needs every budget on the same ones")
    (full_n, full_n0), full = runs[-1]
    models = list(full)
    fraction = {b: f"{b[1] / full_n0:g}" for b, _ in runs}
    lines = [f"Budgets as fractions of N0 = {full_n0}, N = {full_n}. PSNR (dB) and SSIM: mean ± std over "
             f"{len(full[models[0]])} images; s: mean seconds of the hybrid per image (one worker).", "",
             "| model | " + " | ".join(f"{fraction[b]}: PSNR | SSIM | s" for b, _ in runs) + " |",
             "|---|" + "---|---|---|" * len(runs)]
    for m in models:
        cells = []
        for _, rows in runs:
            r = rows[m]
            cells += [mean_std([e["psnr"] for e in r], 2), mean_std([e["ssim"] for e in r], 3),
                      f"{np.mean([e['seconds'] for e in r]):.0f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| budget (N0, N) | mean PSNR over models | PSNR lost against the full budget, per image: "
              "mean (worst) | mean SSIM | seconds per image, all six models |", "|---|---|---|---|---|"]
    for b, rows in runs:
        loss = [f["psnr"] - e["psnr"] for m in models for e, f in zip(rows[m], full[m])]
        every = [e for m in models for e in rows[m]]
        lines.append(f"| {fraction[b]} ({b[1]}, {b[0]}) | {np.mean([e['psnr'] for e in every]):.2f} | "
                     f"{np.mean(loss):+.2f} ({max(loss):+.2f}) | {np.mean([e['ssim'] for e in every]):.3f} | "
                     f"{sum(np.mean([e['seconds'] for e in rows[m]]) for m in models):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.convergence_table")
    p.add_argument("runs", nargs="+", help="one results.json per budget")
    a = p.parse_args(argv)
    return printed(p.prog, lambda: table(a.runs))


if __name__ == "__main__":
    sys.exit(main())
