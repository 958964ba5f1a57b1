"""Sets a study on CIFAR-10 (assets/make_study_cifar.sh) beside the first study on the
bundled photographs (assets/make_study.sh): each index's rank correlations with PSNR in
both, then each model's mean PSNR per attack in both. Same models, same model seed: on
random weights each model's indices are the same in both (checked).

Usage: python assets/study_table.py CIFAR10.json PHOTOGRAPHS.json > table.md
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hybrid as H  # noqa: E402
from heldout_table import table  # noqa: E402


def per_model(path: str) -> tuple[dict, dict]:
    """Each model's indices (from its first pair) and its mean PSNR per attack."""
    rows = [H.csv_row(e, a) for e in json.loads(Path(path).read_text())["runs"] for a in e.get("attacks", {})]
    indices = {r["model"]: tuple(r[i] for i in H.INDICES) for r in reversed(rows)}
    psnr: dict = {}
    for r in rows:
        psnr.setdefault(r["model"], {}).setdefault(r["attack"], []).append(float(r["psnr"]))
    return indices, {m: {a: float(np.mean(v)) for a, v in by.items()} for m, by in psnr.items()}


def model_rows(cifar: str, photographs: str) -> list[str]:
    (idx_c, c), (idx_p, p) = per_model(cifar), per_model(photographs)
    differ = sorted(m for m in idx_c.keys() & idx_p.keys() if idx_c[m] != idx_p[m])
    columns = [(a, by) for a in H.ATTACKS_ORDER for by in (c, p) if any(a in per for per in by.values())]
    name = lambda by: "CIFAR-10" if by is c else "photographs"  # noqa: E731
    lines = ["", "Mean PSNR (dB) per model, sorted by the security index"
             + (f"; indices differ between the studies for {', '.join(differ)}" if differ else "") + ".", "",
             "| model | security index | worst layer's fraction | "
             + " | ".join(f"{H.DISPLAY[a]}: {name(by)}" for a, by in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    show = lambda by, m, a: f"{by[m][a]:.2f}" if a in by.get(m, {}) else "-"  # noqa: E731
    for m in sorted(c, key=lambda m: (idx_c[m][0], m)):
        lines.append(f"| {m} | {idx_c[m][0]:.0f} | {idx_c[m][1]:.3f} | "
                     + " | ".join(show(by, m, a) for a, by in columns) + " |")
    return lines


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("cifar10")
    p.add_argument("photographs")
    a = p.parse_args()
    print(table(a.cifar10, a.photographs, None, ("CIFAR-10", "photographs"), ("models", "models"), "model"), end="")
    print("\n".join(model_rows(a.cifar10, a.photographs)))
