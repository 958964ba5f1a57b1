"""Tabulates the held-out test of the indices (assets/make_heldout.sh) beside the zoo: for
each index and attack, Spearman's rho and Kendall's tau (two-sided p) with PSNR, over
architectures (each one's mean index and mean PSNR over its images) and over
(architecture, image) points, on the random architectures and on the zoo's 35 models at
the same images and settings.

Usage: python assets/heldout_table.py HELDOUT.json ZOO.json [--images 0-4] > table.md
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hybrid as H  # noqa: E402


def image_names(spec: str | None) -> set[str] | None:
    """The CIFAR-10 test images an --images spec such as 0-4 names; None (all) without one."""
    return None if spec is None else {f"cifar10-test:{i}" for i in H.parse_indices([spec])}


def rows_of(path: str, images: set[str] | None, models: list[str] | None = None) -> list[dict]:
    """results.csv's rows of a run's results.json, only `images` and `models` where given."""
    run = json.loads(Path(path).read_text())
    return [H.csv_row(e, a) for e in run["runs"]
            if (images is None or e["image"] in images) and (models is None or e["model"] in models)
            for a in e.get("attacks", {})]


def correlations(rows: list[dict]) -> tuple[dict, int, int]:
    """Each index's correlations with each attack's PSNR, and how many models and images."""
    return H.index_correlations(rows), len({r["model"] for r in rows}), len({r["image"] for r in rows})


def cell(c: dict | None) -> str:
    if c is None:
        return "n/a | n/a"
    show = lambda v, p: "n/a" if v is None else f"{v:+.3f} ({p:.2g})"  # noqa: E731
    return f"{show(c['spearman_rho'], c['spearman_p'])} | {show(c['kendall_tau'], c['kendall_p'])}"


def table(first: list[dict], second: list[dict], names: tuple[str, str] = ("held out", "zoo"),
          kinds: tuple[str, str] = ("random architectures", "models"), unit: str = "architecture") -> str:
    """Two runs' correlations side by side, from their rows: `names` head their columns, `kinds` say what
    their models are, `unit` what a row's 'over' counts."""
    (a_corr, a_models, a_images), (b_corr, b_models, b_images) = correlations(first), correlations(second)
    lines = [f"{names[0][0].upper()}{names[0][1:]}: {a_models} {kinds[0]} x {a_images} images; "
             f"{names[1]}: {b_models} {kinds[1]} x {b_images} images. "
             "Spearman's rho (p) | Kendall's tau (p) of each index with PSNR.", "",
             f"| index | attack | over | {names[0]}: rho (p) | tau (p) | {names[1]}: rho (p) | tau (p) |",
             "|---|---|---|---|---|---|---|"]
    for index in H.INDICES:
        for attack in H.ATTACKS_ORDER:
            for over in ("models", "pairs"):
                a = a_corr.get(index, {}).get(attack, {}).get(over)
                b = b_corr.get(index, {}).get(attack, {}).get(over)
                if a or b:
                    what = f"{unit}s" if over == "models" else f"({unit}, image) points"
                    lines.append(f"| {H.INDICES[index]} | {H.DISPLAY[attack]} | {what} | {cell(a)} | {cell(b)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("heldout")
    p.add_argument("zoo")
    p.add_argument("--images", help="CIFAR-10 test indices to keep from both, e.g. 0-4")
    a = p.parse_args()
    names = image_names(a.images)
    print(table(rows_of(a.heldout, names), rows_of(a.zoo, names)), end="")
