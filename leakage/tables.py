"""The study tables that the scripts in studies/ print, from committed runs' rows: two studies
side by side, the indices' differences, and the defence table with its figure."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from leakage.report import (
    INDICES, Names, PSNR_CAP, correlation_inputs, correlations_read, difference, grouped,
    index_correlations, rank_correlation, readable_points, show_rho, show_tau, summarise
)


def cell_correlations(c: dict | None) -> str:
    """A side-by-side table's two cells: rho [95% CI] (p) | tau [95% CI] (p)."""
    if c is None:
        return "n/a | n/a"
    return f"{show_rho(c)} | {show_tau(c)}"


def show_difference(d: dict | None) -> str:
    if d is None or d["ci95"] is None:
        return "n/a"
    differs = d["ci95"][0] > 0 or d["ci95"][1] < 0
    return f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" + (" *" if differs else "")


DIFFERENCES_READ = ("A difference of two rhos is shown with its 95% bootstrap interval, marked * where the interval "
                    "excludes 0: only then is it called a difference. {how}")


def index_differences(rows: list[dict], names: Names, label: str, unit: str = "model") -> list[str]:
    """Per attack and over what, rho of the worst layer's fraction minus that of the security
    index, paired by model (the same models and images resampled for both)."""
    cells = []
    for attack in names.present(rows):
        for over in ("models", "pairs"):
            fraction, index = (correlation_inputs(rows, i, attack, over) for i in ("worst_layer_fraction",
                                                                                   "security_index"))
            if len(fraction[0]) == len(index[0]) >= 3:
                what = f"{unit}s" if over == "models" else "points"
                cells.append(f"{names.shown(attack)} over {what}: {show_difference(difference(fraction, index, True))}")
    return [f"The worst layer's fraction minus the security index, {label}: " + "; ".join(cells) + "."] if cells else []


def side_by_side(first: list[dict], second: list[dict], names: Names, labels: tuple[str, str] = ("held out", "zoo"),
                 kinds: tuple[str, str] = ("random architectures", "models"), unit: str = "architecture") -> str:
    """Two runs' correlations side by side, from their rows: `labels` head their columns,
    `kinds` say what their models are, `unit` what a row's 'over' counts."""
    def described(rows: list[dict]) -> tuple[dict, int, int]:
        return index_correlations(rows, names), len({r["model"] for r in rows}), len({r["image"] for r in rows})

    (a_corr, a_models, a_images), (b_corr, b_models, b_images) = described(first), described(second)
    paired = {r["model"] for r in first} == {r["model"] for r in second}  # the same models: resampled together
    lines = [f"{labels[0][0].upper()}{labels[0][1:]}: {a_models} {kinds[0]} x {a_images} images; "
             f"{labels[1]}: {b_models} {kinds[1]} x {b_images} images. "
             "Spearman's rho [95% CI] (p) | Kendall's tau [95% CI] (p) of each index with PSNR, and the "
             f"difference of the two rhos, {labels[0]} minus {labels[1]}.", "",
             f"| index | attack | over | {labels[0]}: rho [95% CI] (p) | tau [95% CI] (p) | {labels[1]}: rho [95% CI] "
             "(p) | tau [95% CI] (p) | difference of rho [95% CI] |",
             "|---|---|---|---|---|---|---|---|"]
    for index in INDICES:
        for attack in names.attacks:
            for over in ("models", "pairs"):
                a = a_corr.get(index, {}).get(attack, {}).get(over)
                b = b_corr.get(index, {}).get(attack, {}).get(over)
                if a or b:
                    what = f"{unit}s" if over == "models" else f"({unit}, image) points"
                    d = difference(correlation_inputs(first, index, attack, over),
                                   correlation_inputs(second, index, attack, over), paired) if a and b else None
                    lines.append(f"| {INDICES[index]} | {names.shown(attack)} | {what} | {cell_correlations(a)} | "
                                 f"{cell_correlations(b)} | {show_difference(d)} |")
    how = (f"The two share their {unit}s, so each difference resamples the {unit}s once for both." if paired
           else f"The two hold different {unit}s, so each difference resamples them independently.")
    lines += ["", correlations_read(unit), "", DIFFERENCES_READ.format(how=how), ""]
    lines += index_differences(first, names, labels[0], unit) + index_differences(second, names, labels[1], unit)
    return "\n".join(lines) + "\n"


def per_model(rows: list[dict], names: Names) -> tuple[dict, dict]:
    """Each model's (mean index, mean fraction) and its mean PSNR per attack, from the summary."""
    summary = summarise(rows, names)
    indices = {e["model"]: (e["index_mean"], e["fraction_mean"]) for e in summary}
    psnr: dict = {}
    for e in summary:
        psnr.setdefault(e["model"], {})[e["attack"]] = e["psnr_mean"]
    return indices, psnr


def model_rows(first: list[dict], second: list[dict], labels: tuple[str, str], names: Names) -> list[str]:
    """Each model's mean PSNR per attack in both studies, sorted by the first's index; then
    how alike the two order the rank-deficient models."""
    (idx_c, c), (idx_p, p) = per_model(first, names), per_model(second, names)
    differ = sorted(m for m in idx_c.keys() & idx_p.keys()  # indices are means: equal to rounding
                    if not all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(idx_c[m], idx_p[m])))
    columns = [(a, by) for a in names.attacks for by in (c, p) if any(a in per for per in by.values())]
    label = lambda by: labels[0] if by is c else labels[1]  # noqa: E731
    lines = ["", "Mean PSNR (dB) per model, sorted by the security index"
             + (f"; indices differ between the studies for {', '.join(differ)}" if differ else "") + ".", "",
             "| model | security index | worst layer's fraction | "
             + " | ".join(f"{names.shown(a)}: {label(by)}" for a, by in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    show = lambda by, m, a: f"{by[m][a]:.2f}" if a in by.get(m, {}) else "-"  # noqa: E731
    for m in sorted(c, key=lambda m: (idx_c[m][0], m)):
        lines.append(f"| {m} | {idx_c[m][0]:.0f} | {idx_c[m][1]:.3f} | "
                     + " | ".join(show(by, m, a) for a, by in columns) + " |")
    return lines + agreement(c, p, idx_c, labels, names)


def agreement(c: dict, p: dict, idx_c: dict, labels: tuple[str, str], names: Names) -> list[str]:
    """How alike two studies order the rank-deficient models: Spearman's rho between their
    per-model mean PSNRs, per attack both ran (index-0 models left out: R-GAP's exact answers
    would dominate)."""
    said = []
    for a in names.attacks:
        models = [m for m in c if idx_c[m][0] < 0 and a in c[m] and a in p.get(m, {})]
        rank = rank_correlation([c[m][a] for m in models], [p[m][a] for m in models])
        if rank and rank["spearman_rho"] is not None:
            said.append(f"{names.shown(a)} {rank['spearman_rho']:+.3f} ({len(models)} models)")
    if not said:
        return []
    return ["", f"Spearman's rho between the per-model mean PSNRs of {labels[0]} and {labels[1]}, over the "
            f"rank-deficient models (index < 0): {'; '.join(said)}."]


# -- the defence study ----------------------------------------------------------------------

STOPPED = 15.0  # dB: below this an attack is taken as stopped


def mean_psnr(rows: list[dict], cap: float = math.inf) -> dict[tuple[str, str, str], float]:
    """(model, attack, defence) -> the mean PSNR over the images (each capped at `cap`)."""
    return {k: float(np.mean([min(r["psnr"], cap) for r in v]))
            for k, v in grouped(rows, "model", "attack", "defence").items()}


def show_psnr(x: float) -> str:
    return "exact" if math.isinf(x) else f"{x:.1f}"


def images_per_mean(rows: list[dict], attacks: list[str], names: Names) -> str:
    """How many images each attack's means are over: a study's parts may attack different numbers."""
    return ", ".join(f"{names.shown(a)} {image_counts(rows, a)}" for a in attacks)


def image_counts(rows: list[dict], attack: str) -> str:
    """The images one attack's means are over, per (model, defence): '5', or '3-5' where they differ."""
    counts = {len({r["image"] for r in v}) for v in grouped([r for r in rows if r["attack"] == attack],
                                                            "model", "defence").values()}
    return f"{min(counts)}" + (f"-{max(counts)}" if max(counts) > min(counts) else "")


def specs_of(rows: list[dict]) -> dict[str, tuple[str, float, str]]:
    """defence spec -> (its kind, its strength, its curve), as the rows carry them."""
    return {r["defence"]: (r["kind"], r["strength"], r["curve"]) for r in rows}


def curves_of(specs: dict[str, tuple[str, float, str]], names: Names) -> list[tuple[str, str]]:
    """The (kind, curve) of the specs but none's, in Names' order of kinds."""
    have = {(kind, curve) for kind, _, curve in specs.values() if kind != "none"}
    return [(k, c) for k in names.strengths for c in sorted(c for kind, c in have if kind == k)]


def apart(ax: object, ticks: list[float], gap: float = 0.06) -> list[str]:
    """The ticks' labels, each left blank where it would stand within `gap` (of the axis's
    width) of the last one shown: prune's 0 and 0.2 sit 0.05 apart on its -log10(1 - P) axis."""
    span = [ax.transScale.transform((t, 0))[0] for t in ax.get_xlim()]
    labels, last = [], None
    for t in ticks:
        at = (ax.transScale.transform((t, 0))[0] - span[0]) / (span[1] - span[0])
        shown = last is None or at - last >= gap
        labels.append(f"{t:g}" if shown else "")
        last = at if shown else last
    return labels


def curve_name(kind: str, curve: str, curves: list[tuple[str, str]]) -> str:
    """A kind's name, with its curve's where the kind has several ('dp C=1')."""
    return f"{kind} {curve}" if sum(k == kind for k, _ in curves) > 1 else kind


def mean_table(means: dict, models: list[str], attacks: list[str], specs: list[str], images: str,
               names: Names) -> list[str]:
    lines = [f"Mean PSNR (dB) over the images ({images}), per model and attack, under each defence:", "",
             "| model | attack | " + " | ".join(specs) + " |", "|---|---|" + "---|" * len(specs)]
    for m in models:
        for a in attacks:
            if (m, a, "none") in means:
                lines.append(f"| {m} | {names.shown(a)} | "
                             + " | ".join(show_psnr(means[m, a, s]) if (m, a, s) in means else "" for s in specs)
                             + " |")
    return lines + [""]


def stopping_table(means: dict, models: list[str], attacks: list[str], specs: dict[str, tuple[str, float, str]],
                   names: Names) -> list[str]:
    """The weakest strength of each kind from which on the mean PSNR stays below STOPPED
    (at it and at every stronger one), and the mean there; '-' where no strength in the
    grid gets there, 'already' where no defence is needed."""
    curves = curves_of(specs, names)  # a column per curve: strengths of different curves are not one grid
    lines = [f"The weakest strength in the grid from which on each defence keeps an attack's mean PSNR below "
             f"{STOPPED:g} dB, there and at every stronger point (the mean there in brackets; '-': not within the "
             "grid; 'already': below it undefended):",
             "", "| model | attack | " + " | ".join(f"{curve_name(k, c, curves)} ({names.strengths[k][1]})"
                                                  for k, c in curves) + " |",
             "|---|---|" + "---|" * len(curves)]
    for m in models:
        for a in attacks:
            if (m, a, "none") not in means:
                continue
            if means[m, a, "none"] < STOPPED:
                lines.append(f"| {m} | {names.shown(a)} | " + " | ".join("already" for _ in curves) + " |")
                continue
            cells = []
            for k, c in curves:
                grid = sorted((s for s, (kind, _, curve) in specs.items() if (kind, curve) == (k, c)
                               and (m, a, s) in means), key=lambda s: specs[s][1])
                # from here on every stronger point too: a chaotic attack (DLG) can dip below the line at one
                # strength and rise above it at the next, and a defence that stops it must stop it when stronger
                hit = next((s for i, s in enumerate(grid) if all(means[m, a, t] < STOPPED for t in grid[i:])), None)
                cells.append("-" if hit is None else f"{specs[hit][1]:g} ({means[m, a, hit]:.1f})")
            lines.append(f"| {m} | {names.shown(a)} | " + " | ".join(cells) + " |")
    return lines + [""]


def pruning_table(rows: list[dict], models: list[str], specs: dict[str, tuple[str, float, str]], names: Names,
                  removes_equations: set[str]) -> list[str]:
    """Under pruning: the security index of the surviving equations (mean over the images)
    beside each attack's mean PSNR, and the rank correlation of the two over the points."""
    from scipy import stats

    linear = [r for r in rows if r["attack"] in ("rgap", "hybrid")]
    pruned = [r for r in linear if r["kind"] in removes_equations]
    if not pruned:
        return []
    lines = ["Under pruning: the security index of the equations that survive (mean over the images; the "
             "undefended index in the first row of each model) against the mean PSNR:", "",
             "| model | P | security index | worst layer's fraction | fc inputs undetermined | R-GAP | Hybrid |",
             "|---|---|---|---|---|---|---|"]
    by = grouped(linear, "model", "defence")
    for m in models:
        for s in [s for s, (kind, _, _) in specs.items() if kind == "none" or kind in removes_equations]:
            if (m, s) not in by:
                continue
            g = by[m, s]
            cells = [f"{np.mean([r['security_index'] for r in g]):.0f}",
                     f"{np.mean([r['worst_layer_fraction'] for r in g]):.4f}",
                     f"{np.mean([r['fc_inputs_undetermined'] for r in g]):.1%}"]
            cells += [show_psnr(np.mean([r["psnr"] for r in g if r["attack"] == a])) for a in ("rgap", "hybrid")]
            lines.append(f"| {m} | {specs[s][1]:g} | " + " | ".join(cells) + " |")
    lines.append("")
    for a in ("rgap", "hybrid"):
        sub = [r for r in pruned if r["attack"] == a]
        finite = [r for r in sub if math.isfinite(r["psnr"])]
        rho, pv = stats.spearmanr([r["security_index"] for r in finite], [r["psnr"] for r in finite])
        zero = [r["psnr"] for r in sub if r["security_index"] == 0]
        rest = [r["psnr"] for r in sub if r["security_index"] != 0]
        lines.append(f"- {names.shown(a)}: Spearman's rho of the index under pruning against PSNR over the "
                     f"{len(finite)} pruned (model, image, P): {rho:+.3f} (p {pv:.2g}); index 0: "
                     f"{len(zero)} points, PSNR min {show_psnr(min(zero)) if zero else '-'}; index below 0: "
                     f"{len(rest)} points, PSNR max {show_psnr(max(rest)) if rest else '-'}.")
    return lines + [""]


def ordered_specs(rows: list[dict], names: Names) -> dict[str, tuple[str, float, str]]:
    """The rows' defence specs: none first, then by kind (Names' order), curve and strength."""
    specs = specs_of(rows)
    kinds = list(names.strengths)
    order = lambda s: (kinds.index(specs[s][0]) + 1 if specs[s][0] != "none" else 0, specs[s][2], specs[s][1])  # noqa: E731
    return {s: specs[s] for s in sorted(specs, key=order)}


def defence_table(rows: list[dict], names: Names, removes_equations: set[str]) -> str:
    """The defence study's tables: mean PSNR per defence, the weakest strength that stops each
    attack, and the index under pruning."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    specs = ordered_specs(rows, names)
    attacks = names.present(rows)
    means = mean_psnr(rows)
    return "\n".join(mean_table(means, models, attacks, list(specs), images_per_mean(rows, attacks, names), names)
                     + stopping_table(means, models, attacks, specs, names)
                     + pruning_table(rows, models, specs, names, removes_equations))


def plot_defence_table(rows: list[dict], path: Path, names: Names) -> object:
    """Mean PSNR over the images against each defence's strength: a row of panels per
    model, a column per kind, a line per attack; no defence at 0 on every panel."""
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(r["model"] for r in rows))
    specs = specs_of(rows)
    curves = curves_of(specs, names)  # a column per curve (dp at each clip C): never one line through two
    attacks = names.present(rows)
    means = mean_psnr(rows, PSNR_CAP)
    shown = {a: f"{names.shown(a)} (means over {image_counts(rows, a)} images)" for a in attacks}
    width = 3.2 * len(curves) + 1.6
    points = readable_points(width)  # every text readable at a README's width
    fig = Figure(figsize=(width, 2.1 * len(models) + 0.6), layout="constrained")
    axes = fig.subplots(len(models), len(curves), sharey=True, squeeze=False)
    for r, m in enumerate(models):
        for c, (kind, which) in enumerate(curves):
            ax = axes[r, c]
            for a in attacks:
                curve = sorted((specs[s][1], v) for (mm, aa, s), v in means.items()
                               if mm == m and aa == a and (specs[s][0] == "none" or specs[s][::2] == (kind, which)))
                if len(curve) > 1:
                    ax.plot(*zip(*curve), marker=names.marker(a), ms=3.5, lw=1, label=shown[a],
                            color=f"C{list(names.attacks).index(a)}")
            ax.axhline(STOPPED, color="grey", lw=0.8, ls="--")
            positive = sorted(x for k, x, w in specs.values() if (k, w) == (kind, which))
            if kind == "prune":  # P's decades toward 1 (0.9, 0.95, 0.99) apart: the axis is -log10(1 - P)
                ax.set_xscale("function", functions=(lambda q: -np.log10(1 - np.minimum(q, 1 - 1e-9)),
                                                     lambda t: 1 - 10.0 ** -t))
                right = -math.log10(1 - positive[-1])
                ax.set_xlim(1 - 10 ** (0.04 * right), 1 - 10 ** -(1.04 * right))
            else:
                ax.set_xscale("symlog", linthresh=positive[0] / 2)
                ax.set_xlim(left=-positive[0] / 8)  # no negative decades: none sits at 0, on the left
            ticks = [0.0, *positive]
            ax.set_xticks(ticks, apart(ax, ticks), rotation=90, fontsize=points)
            ax.tick_params(axis="y", labelsize=points)
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            if r == 0:  # the strength in words: "dp (Z C)" alone did not say it is the noise's std
                ax.set_title(f"{curve_name(kind, which, curves)}\n{names.strengths[kind][0]}", fontsize=max(9, points))
            if r == len(models) - 1 and kind == "prune":
                ax.set_xlabel("P (the axis: -log10(1 - P))", fontsize=points)
            if c == 0:
                ax.set_ylabel(f"{m}\nPSNR (dB)", fontsize=max(10, points))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=points)
    fig.suptitle(f"Mean PSNR over the images against the defence's strength (dashed: {STOPPED:g} dB; "
                 f"capped at {PSNR_CAP:g})", fontsize=max(9, points))
    fig.savefig(path, dpi=110)
    return fig
