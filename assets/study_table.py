"""Sets one zoo study beside another: by default a study on CIFAR-10
(assets/make_study_cifar.sh) beside the first study on the bundled photographs
(assets/make_study.sh); with --names, --images and --models, e.g. the trained CIFAR-10
study beside the random one on the same images, or the baselines beside the study. Each
index's rank correlations with PSNR in both, then each model's mean PSNR per attack in
both. Same models, same model seed: each model's indices are the same in both (checked;
the ranks are the architecture's).

Usage: python assets/study_table.py FIRST.json SECOND.json [--names CIFAR-10 photographs]
           [--images 0-9] [--models cnn2_c2 lenet ...] > table.md
"""
import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hybrid as H  # noqa: E402
from heldout_table import image_names, rows_of, table  # noqa: E402


def per_model(rows: list[dict]) -> tuple[dict, dict]:
    """Each model's indices and its mean PSNR per attack, from hybrid.py's summary of the rows."""
    summary = H.summarise(rows)
    indices = {e["model"]: (e["index_mean"], e["fraction_mean"]) for e in summary}
    psnr: dict = {}
    for e in summary:
        psnr.setdefault(e["model"], {})[e["attack"]] = e["psnr_mean"]
    return indices, psnr


def model_rows(cifar: list[dict], photographs: list[dict], names: tuple[str, str]) -> list[str]:
    (idx_c, c), (idx_p, p) = per_model(cifar), per_model(photographs)
    differ = sorted(m for m in idx_c.keys() & idx_p.keys()  # indices are means: equal to rounding
                    if not all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(idx_c[m], idx_p[m])))
    columns = [(a, by) for a in H.ATTACKS_ORDER for by in (c, p) if any(a in per for per in by.values())]
    name = lambda by: names[0] if by is c else names[1]  # noqa: E731
    lines = ["", "Mean PSNR (dB) per model, sorted by the security index"
             + (f"; indices differ between the studies for {', '.join(differ)}" if differ else "") + ".", "",
             "| model | security index | worst layer's fraction | "
             + " | ".join(f"{H.DISPLAY[a]}: {name(by)}" for a, by in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    show = lambda by, m, a: f"{by[m][a]:.2f}" if a in by.get(m, {}) else "-"  # noqa: E731
    for m in sorted(c, key=lambda m: (idx_c[m][0], m)):
        lines.append(f"| {m} | {idx_c[m][0]:.0f} | {idx_c[m][1]:.3f} | "
                     + " | ".join(show(by, m, a) for a, by in columns) + " |")
    return lines + agreement(c, p, idx_c, names)


def agreement(c: dict, p: dict, idx_c: dict, names: tuple[str, str]) -> list[str]:
    """How alike the two studies order the rank-deficient models: Spearman's rho between their per-model
    mean PSNRs, per attack both ran (index-0 models left out: R-GAP's exact answers would dominate)."""
    said = []
    for a in H.ATTACKS_ORDER:
        models = [m for m in c if idx_c[m][0] < 0 and a in c[m] and a in p.get(m, {})]
        rank = H.rank_correlation([c[m][a] for m in models], [p[m][a] for m in models])
        if rank and rank["spearman_rho"] is not None:
            said.append(f"{H.DISPLAY[a]} {rank['spearman_rho']:+.3f} ({len(models)} models)")
    if not said:
        return []
    return ["", f"Spearman's rho between the per-model mean PSNRs of {names[0]} and {names[1]}, over the "
            f"rank-deficient models (index < 0): {'; '.join(said)}."]


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--names", nargs=2, default=["CIFAR-10", "photographs"], help="the two studies' names")
    p.add_argument("--images", help="CIFAR-10 test indices to keep from both, e.g. 0-9")
    p.add_argument("--models", nargs="+", help="models to keep from both (default: all)")
    a = p.parse_args()
    images = image_names(a.images)
    first, second = rows_of(a.first, images, a.models), rows_of(a.second, images, a.models)
    print(table(first, second, tuple(a.names), ("models", "models"), "model"), end="")
    print("\n".join(model_rows(first, second, tuple(a.names))))
