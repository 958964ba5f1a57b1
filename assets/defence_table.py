"""Tabulates a defence study (bash assets/make_defences.sh): per model and attack, the mean
PSNR over the images under each defence; per defence kind, the weakest strength in the grid
from which on an attack's mean PSNR stays below 15 dB; and, under pruning, the security index of
the equations that survive against the PSNR that R-GAP and the hybrid reach.

Usage: python assets/defence_table.py STUDY.json [STUDY.json ...] [--figure PNG] > table.md
(several results.json, e.g. the linear attacks' and the baselines', are read as one study;
--figure draws the PSNR against each defence's strength, a panel per model and kind)
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hybrid as H  # noqa: E402

STOPPED = 15.0  # dB: below this an attack is taken as stopped (the line)
STRENGTH = {"noise": "SIGMA", "prune": "P", "dp": "Z C"}  # each kind's axis, as hybrid.defence_strength measures it


def psnr(attack: dict) -> float:
    return math.inf if attack["psnr"] is None else attack["psnr"]  # null: an exact reconstruction


def points(paths: list[str]) -> list[dict]:
    """One point per (model, image, defence, attack): its PSNR and the indices of the
    equations the attacker has (under pruning, the surviving ones)."""
    out = []
    for path in paths:
        for e in json.loads(Path(path).read_text())["runs"]:
            defence = e.get("defence", {})
            has = defence if defence.get("kind") == "prune" else e | {"fc_inputs_undetermined": 0.0}
            for attack, a in e.get("attacks", {}).items():
                out.append({"model": e["model"], "image": e["image"], "spec": defence.get("spec", "none"),
                            "attack": attack, "psnr": psnr(a), "pruned": defence.get("kind") == "prune",
                            "index": has.get("security_index"), "fraction": has.get("worst_layer_fraction"),
                            "fc_undetermined": has.get("fc_inputs_undetermined", math.nan)})
    return out


def grouped(pts: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for p in pts:
        out.setdefault(tuple(p[k] for k in keys), []).append(p)
    return out


def mean_psnr(pts: list[dict], cap: float = math.inf) -> dict[tuple[str, str, str], float]:
    """(model, attack, spec) -> the mean PSNR over the images (each capped at `cap`)."""
    return {k: float(np.mean([min(p["psnr"], cap) for p in v])) for k, v in grouped(pts, "model", "attack", "spec").items()}


def strength(spec: str) -> float:
    return H.defence_strength(spec)[1]


def fmt(x: float) -> str:
    return "exact" if math.isinf(x) else f"{x:.1f}"


def images_per_mean(pts: list[dict], attacks: list[str]) -> str:
    """How many images each attack's means are over: the studies' parts attack different numbers."""
    counts = {}
    for (attack, _, _), v in grouped(pts, "attack", "model", "spec").items():
        counts.setdefault(attack, set()).add(len({p["image"] for p in v}))
    spans = [(a, min(counts[a]), max(counts[a])) for a in attacks]
    return ", ".join(f"{H.DISPLAY[a]} {lo}" + (f"-{hi}" if hi > lo else "") for a, lo, hi in spans)


def mean_table(means: dict, models: list[str], attacks: list[str], specs: list[str], images: str) -> list[str]:
    lines = [f"Mean PSNR (dB) over the images ({images}), per model and attack, under each defence:", "",
             "| model | attack | " + " | ".join(specs) + " |", "|---|---|" + "---|" * len(specs)]
    for m in models:
        for a in attacks:
            if (m, a, "none") in means:
                lines.append(f"| {m} | {H.DISPLAY[a]} | "
                             + " | ".join(fmt(means[m, a, s]) if (m, a, s) in means else "" for s in specs) + " |")
    return lines + [""]


def stopping_table(means: dict, models: list[str], attacks: list[str], specs: list[str]) -> list[str]:
    """The weakest strength of each kind from which on the mean PSNR stays below STOPPED
    (at it and at every stronger one), and the mean there; '-' where no strength in the
    grid gets there, 'already' where no defence is needed."""
    kinds = [k for k in STRENGTH if any(H.parse_defence(s).kind == k for s in specs)]
    lines = [f"The weakest strength in the grid from which on each defence keeps an attack's mean PSNR below "
             f"{STOPPED:g} dB, there and at every stronger point (the mean there in brackets; '-': not within the grid; 'already': below it undefended):",
             "", "| model | attack | " + " | ".join(f"{k} ({STRENGTH[k]})" for k in kinds) + " |",
             "|---|---|" + "---|" * len(kinds)]
    for m in models:
        for a in attacks:
            if (m, a, "none") not in means:
                continue
            if means[m, a, "none"] < STOPPED:
                lines.append(f"| {m} | {H.DISPLAY[a]} | " + " | ".join("already" for _ in kinds) + " |")
                continue
            cells = []
            for k in kinds:
                grid = sorted((s for s in specs if H.parse_defence(s).kind == k and (m, a, s) in means), key=strength)
                # from here on every stronger point too: a chaotic attack (DLG) can dip below the line at one
                # strength and rise above it at the next, and a defence that stops it must stop it when stronger
                hit = next((s for i, s in enumerate(grid) if all(means[m, a, t] < STOPPED for t in grid[i:])), None)
                cells.append("-" if hit is None else f"{strength(hit):g} ({means[m, a, hit]:.1f})")
            lines.append(f"| {m} | {H.DISPLAY[a]} | " + " | ".join(cells) + " |")
    return lines + [""]


def pruning_table(pts: list[dict], models: list[str], specs: list[str]) -> list[str]:
    """Under pruning: the security index of the surviving equations (mean over the images)
    beside each attack's mean PSNR, and the rank correlation of the two over the points."""
    pruned = [p for p in pts if p["pruned"] and p["attack"] in ("rgap", "hybrid")]
    if not pruned:
        return []
    lines = ["Under pruning: the security index of the equations that survive (mean over the images; the "
             "undefended index in the first row of each model) against the mean PSNR:", "",
             "| model | P | security index | worst layer's fraction | fc inputs undetermined | R-GAP | Hybrid |",
             "|---|---|---|---|---|---|---|"]
    by = grouped([p for p in pts if p["attack"] in ("rgap", "hybrid")], "model", "spec")
    for m in models:
        for s in [s for s in specs if s == "none" or H.parse_defence(s).prunes]:
            if (m, s) not in by:
                continue
            g = by[m, s]
            cells = [f"{np.mean([p['index'] for p in g]):.0f}", f"{np.mean([p['fraction'] for p in g]):.4f}",
                     f"{np.mean([p['fc_undetermined'] for p in g]):.1%}"]
            cells += [fmt(np.mean([p["psnr"] for p in g if p["attack"] == a])) for a in ("rgap", "hybrid")]
            lines.append(f"| {m} | {strength(s):g} | " + " | ".join(cells) + " |")
    lines.append("")
    for a in ("rgap", "hybrid"):
        sub = [p for p in pruned if p["attack"] == a]
        finite = [p for p in sub if math.isfinite(p["psnr"])]
        rho, pv = stats.spearmanr([p["index"] for p in finite], [p["psnr"] for p in finite])
        zero = [p["psnr"] for p in sub if p["index"] == 0]
        rest = [p["psnr"] for p in sub if p["index"] != 0]
        lines.append(f"- {H.DISPLAY[a]}: Spearman's rho of the index under pruning against PSNR over the "
                     f"{len(finite)} pruned (model, image, P): {rho:+.3f} (p {pv:.2g}); index 0: "
                     f"{len(zero)} points, PSNR min {fmt(min(zero)) if zero else '-'}; index below 0: {len(rest)} "
                     f"points, PSNR max {fmt(max(rest)) if rest else '-'}.")
    return lines + [""]


def table(pts: list[dict]) -> str:
    models = list(dict.fromkeys(p["model"] for p in pts))
    specs = sorted(dict.fromkeys(p["spec"] for p in pts),
                   key=lambda s: (list(STRENGTH).index(H.parse_defence(s).kind) + 1
                                  if s != "none" else 0, strength(s)))
    attacks = [a for a in H.DISPLAY if any(p["attack"] == a for p in pts)]
    means = mean_psnr(pts)
    return "\n".join(mean_table(means, models, attacks, specs, images_per_mean(pts, attacks))
                     + stopping_table(means, models, attacks, specs) + pruning_table(pts, models, specs))


def figure(pts: list[dict], path: str) -> None:
    """Mean PSNR over the images against each defence's strength: a row of panels per
    model, a column per kind, a line per attack; no defence at 0 on every panel."""
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(p["model"] for p in pts))
    kinds = [k for k in STRENGTH if any(H.parse_defence(p["spec"]).kind == k for p in pts)]
    attacks = [a for a in H.ATTACKS_ORDER if any(p["attack"] == a for p in pts)]
    means = mean_psnr(pts, H.PSNR_CAP)
    specs = {p["spec"] for p in pts}
    fig = Figure(figsize=(3.2 * len(kinds) + 1.6, 2.1 * len(models) + 0.6), layout="constrained")
    axes = fig.subplots(len(models), len(kinds), sharey=True, squeeze=False)
    for r, m in enumerate(models):
        for c, kind in enumerate(kinds):
            ax = axes[r, c]
            for a in attacks:
                curve = sorted((strength(s), v) for (mm, aa, s), v in means.items()
                               if mm == m and aa == a and H.parse_defence(s).kind in (kind, "none"))
                if len(curve) > 1:
                    ax.plot(*zip(*curve), marker=H.ATTACK_MARKERS[a], ms=3.5, lw=1, label=H.DISPLAY[a],
                            color=f"C{H.ATTACKS_ORDER.index(a)}")
            ax.axhline(STOPPED, color="grey", lw=0.8, ls="--")
            positive = sorted(strength(s) for s in specs if H.parse_defence(s).kind == kind)
            if kind != "prune":
                ax.set_xscale("symlog", linthresh=positive[0] / 2)
                ax.set_xlim(left=-positive[0] / 8)  # no negative decades: none sits at 0, on the left
            ticks = [0.0, *positive]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks], rotation=60, fontsize=7)
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(f"{kind} ({STRENGTH[kind]})")
            if c == 0:
                ax.set_ylabel(f"{m}\nPSNR (dB)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle(f"Mean PSNR over the images against the defence's strength (dashed: {STOPPED:g} dB; "
                 f"capped at {H.PSNR_CAP:g})", fontsize=9)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("studies", nargs="+")
    p.add_argument("--figure", help="also draw the study's figure here")
    a = p.parse_args()
    pts = points(a.studies)
    print(table(pts), end="")
    if a.figure:
        figure(pts, a.figure)
