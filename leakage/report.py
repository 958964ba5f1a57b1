"""What a run folder says: its summaries, the indices' correlations and every figure (the
tables the study scripts print from such rows are leakage/tables.py).

hybrid.py runs the paper's experiment and sweeps.py keeps its record; this module reads
that record's rows and draws and tabulates them. It imports sweeps and the plotting and
statistics libraries, never hybrid.py: what it needs to know of the attacks and the
defences (their names, markers and axes) it is handed as `Names`.

A row is one attack on one (model, image, defence) cell, with typed values:

    model, image, defence (its spec), attack: str
    label: int, label_correct: bool (None where no label was given: a captured gradient's)
    psnr: float (inf for an exact reconstruction; NaN, like ssim, where no target was given), ssim,
        seconds: float
    security_index, worst_layer_fraction: float or None (of the equations the attacker has)
    kind: the defence's kind; strength: float (its figures' x, 0 for none); curve: str (the
        parameters held fixed along one curve, "C=1"; "" where a kind has one curve)
    first_activation: str (the study figure's colour); fc_inputs_undetermined: float

Sections: correlations; summaries; the figures of a run (comparison, index against quality,
defences); finish (what a sweep and a merge end with).
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leakage import sweeps
from leakage.console import say

INDICES = {"security_index": "security index", "worst_layer_fraction": "worst layer's fraction"}  # column: name
INDEX_FIGURES = {"security_index": "index_vs_quality.png", "worst_layer_fraction": "fraction_vs_quality.png"}
PSNR_CAP = 50.0  # the study figures' PSNR axis; above it (R-GAP's exact answers) drawn at the cap
FIGURE_CELLS = 8  # a sweep's comparison figure shows its first few cells


@dataclass(frozen=True)
class Names:
    """What the figures and tables call the attacks and the defences, from the registries of
    the program that wrote the rows (hybrid.names())."""

    attacks: dict[str, tuple[str, str]]  # attack -> (its name shown, its marker), in the columns' order
    strengths: dict[str, tuple[str, str]]  # defence kind but none -> (its strength's axis, its symbol), in order
    classes: tuple[str, ...] = ()  # the labels' class names, where the data names them
    budget: dict[str, int] = field(default_factory=dict)  # the paper's iterations, by setting

    def label(self, label: int | None) -> str:
        if label is None:  # a captured gradient's, where no label was given
            return "label not given"
        named = 0 <= label < len(self.classes) and self.classes[label] != str(label)  # MNIST's digits are their names
        return f"label {label}" + (f" ({self.classes[label]})" if named else "")

    def shown(self, attack: str) -> str:
        return self.attacks[attack][0]

    def marker(self, attack: str) -> str:
        return self.attacks[attack][1]

    def present(self, rows: list[dict]) -> list[str]:
        """The attacks the rows hold, in the columns' order."""
        have = {r["attack"] for r in rows}
        return [a for a in self.attacks if a in have]


def format_psnr(psnr: float | None, digits: int = 1) -> str:
    return "exact" if psnr is None or math.isinf(psnr) else f"{psnr:.{digits}f} dB"


def scored(entry: dict) -> bool:
    """Whether a cell's entry had a target to score against (a captured gradient attacked with
    no image named has none: its target is null)."""
    return entry.get("target", {}) is not None


def fraction_text(fraction: float | None) -> str:
    return "unknown" if fraction is None else f"{fraction:.4f}"


# =============================================================================
# Correlations: do the indices predict leakage?
# =============================================================================


def index_by_model(rows: list[dict], index: str = "security_index") -> dict[str, list[float]]:
    """model -> its index (a column of INDICES) on each of its images (every row carries its
    cell's indices)."""
    per_image: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get(index) is not None:
            per_image.setdefault(r["model"], {})[r["image"]] = float(r[index])
    return {model: list(values.values()) for model, values in per_image.items()}


EXACT_UP_TO = 8  # points: Spearman's p by all n! pairings up to here (40320), scipy's t approximation above
RESAMPLES = 2000  # bootstrap resamples behind every interval
BOOTSTRAP_SEED = 0  # fixed, so that a table regenerates byte-identical


def rank_correlation(x: list[float], y: list[float], units: list | None = None) -> dict | None:
    """Spearman's rho and Kendall's tau, each with a 95% bootstrap interval (`ci95`,
    `kendall_ci95`, from RESAMPLES resamples) and two-sided p-values (null where a constant
    input leaves them undefined); None for fewer than 3 points, where they mean nothing.

    `units` names what is resampled, each point's (its model; by default each point its own):
    the points are taken in the units' sorted order, so that the order they come in changes
    nothing. Where a unit holds several points (a model's images, which share its index) they
    are not independent: the interval resamples whole units (a cluster bootstrap), and no
    p-value is given, since scipy's assume independent points (the study's 700 points hold
    13 distinct index values; their naive p-values said 1e-74).

    scipy's Spearman p-value is a t approximation that says p = 0 for three points in
    order; up to EXACT_UP_TO points it comes instead from the exact permutation test (every
    pairing of the ranks). Kendall's p is scipy's, which is exact for small samples without
    ties (method='auto')."""
    from scipy import stats

    if len(x) < 3:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input leaves them undefined (NaN): null
        rho, p = stats.spearmanr(x, y)
        tau, q = stats.kendalltau(x, y)
        if len(x) <= EXACT_UP_TO and np.isfinite(rho):  # every order of y's ranks against x's
            x_ranks = stats.rankdata(x)
            p = stats.permutation_test((stats.rankdata(y),), lambda b, axis=-1: pearson(x_ranks, b, axis),
                                       vectorized=True, permutation_type="pairings", n_resamples=math.inf).pvalue
    finite = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
    rhos, taus = resampled_correlations(x, y, units)
    out = {"n": len(x), "spearman_rho": finite(rho), "spearman_p": finite(p), "kendall_tau": finite(tau),
           "kendall_p": finite(q), "ci95": interval(rhos), "kendall_ci95": interval(taus), "resamples": RESAMPLES}
    if units is not None and len(set(units)) < len(units):
        out |= {"clusters": len(set(units)), "spearman_p": None, "kendall_p": None}
    return out


def resampled_correlations(x: list[float], y: list[float], units: list | None = None,
                           resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Spearman's rho and Kendall's tau over bootstrap resamples of the `units` (each point's;
    by default each point its own) in their sorted order, each drawn with all its points: with
    several points to a unit, the cluster bootstrap (Davison and Hinkley 1997, Sec. 3.8). NaN
    where a resample is constant. scipy.stats.bootstrap resamples points, not clusters, and its
    interval is NaN once one resample is. Drawn once a process for the same arguments: a
    difference of two correlations resamples what their own intervals did."""
    return bootstrap(tuple(x), tuple(y), None if units is None else tuple(units), resamples, seed)


@functools.lru_cache(maxsize=256)
def bootstrap(x: tuple, y: tuple, units: tuple | None, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """resampled_correlations, of hashable arguments. The arrays it returns are shared: read only."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    groups = np.unique(np.arange(len(x)) if units is None else np.asarray(units), return_inverse=True)[1]
    members = [np.flatnonzero(groups == g) for g in range(groups.max() + 1)]
    draws = np.random.default_rng(seed).integers(len(members), size=(resamples, len(members)))
    if len({len(m) for m in members}) == 1:  # clusters of one size: every resample at once
        take = np.stack(members)[draws].reshape(resamples, -1)
    else:
        take = [np.concatenate([members[g] for g in draw]) for draw in draws]
    rhos = np.array([spearman_rows(x[t], y[t]) for t in take]) if isinstance(take, list) else \
        spearman_rows(x[take], y[take])
    if not isinstance(take, list) and take.shape[1] <= SIGN_MATRIX_UP_TO:
        taus = np.concatenate([kendall_rows(x[take[i:i + 100]], y[take[i:i + 100]]) for i in range(0, resamples, 100)])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            taus = np.array([stats.kendalltau(x[t], y[t])[0] for t in take])
    return rhos, taus


SIGN_MATRIX_UP_TO = 60  # points: Kendall's tau of every resample at once (their n x n signs) up to here


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of x against the same row of y (scipy's spearmanr, row by row)."""
    from scipy import stats

    with np.errstate(invalid="ignore", divide="ignore"):
        return pearson(stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1))


def kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row of x against the same row of y (scipy's kendalltau), from the
    signs of every pair's differences."""
    sx, sy = np.sign(x[:, :, None] - x[:, None, :]), np.sign(y[:, :, None] - y[:, None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sx * sy).sum((1, 2)) / np.sqrt((sx * sx).sum((1, 2)) * (sy * sy).sum((1, 2)))


def interval(values: np.ndarray) -> list[float] | None:
    """The 95% percentile interval of resampled values, those a resample left undefined
    dropped; None where more than half were."""
    finite = values[np.isfinite(values)]
    if len(finite) < len(values) / 2:
        return None
    return [float(v) for v in np.percentile(finite, [2.5, 97.5])]


def difference(first: tuple[list, list, list], second: tuple[list, list, list], paired: bool) -> dict | None:
    """Spearman's rho of `first` (x, y, clusters) minus that of `second`, with the 95%
    interval of the difference: resampling the clusters once for both where they are the same
    clusters (`paired`: two indices of one study, or two studies of one set of models), each
    on its own where they are not. The difference is one only where the interval excludes 0."""
    from scipy import stats

    (x1, y1, c1), (x2, y2, c2) = first, second
    if min(len(x1), len(x2)) < 3:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input: NaN
        rho = stats.spearmanr(x1, y1)[0] - stats.spearmanr(x2, y2)[0]
    if not np.isfinite(rho):
        return None
    if paired and sorted(set(c1)) != sorted(set(c2)):
        raise ValueError("a paired difference needs the same clusters in both")
    seeds = (BOOTSTRAP_SEED, BOOTSTRAP_SEED if paired else BOOTSTRAP_SEED + 1)  # paired: the same draws
    d = resampled_correlations(x1, y1, c1, seed=seeds[0])[0] - resampled_correlations(x2, y2, c2, seed=seeds[1])[0]
    return {"difference": float(rho), "ci95": interval(d), "paired": paired, "resamples": RESAMPLES}


def correlation_inputs(rows: list[dict], index: str, attack: str, over: str) -> tuple[list, list, list]:
    """What index_correlations correlates, with each point's unit of resampling (its model):
    over models, each model's mean index and mean PSNR; over pairs, every (model, image)
    (a model's images share its index: one cluster)."""
    points = [r for r in rows if r["attack"] == attack and r.get(index) is not None]
    if over == "pairs":
        return [r[index] for r in points], [r["psnr"] for r in points], [r["model"] for r in points]
    by_model = grouped(points, "model")
    mean = lambda group, key: float(np.mean([r[key] for r in group]))  # noqa: E731
    return ([mean(g, index) for g in by_model.values()], [mean(g, "psnr") for g in by_model.values()],
            [model for (model,) in by_model])


def pearson(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson's correlation along `axis` (of ranks: Spearman's rho), for permutation_test."""
    a, b = a - a.mean(axis, keepdims=True), b - b.mean(axis, keepdims=True)
    return (a * b).sum(axis) / np.sqrt((a * a).sum(axis) * (b * b).sum(axis))


def index_correlations(rows: list[dict], names: Names) -> dict:
    """Per index and attack, rank correlations of the index with PSNR over models (each
    model's mean index and mean PSNR over its images) and over every (model, image) point.
    Both indices are <= 0, so leakage that grows as they rise toward 0 gives a positive
    correlation."""
    out: dict[str, dict] = {}
    for index in INDICES:
        for attack in names.attacks:
            over = {what: rank_correlation(*correlation_inputs(rows, index, attack, what))
                    for what in ("models", "pairs")}
            if any(over.values()):
                out.setdefault(index, {})[attack] = {what: c for what, c in over.items() if c is not None}
    return out


def show_correlation(value: float | None, p: float | None, ci: list | None = None) -> str:
    """'+0.671 [+0.37, +0.87] (p 1e-05)': the value, its 95% interval where there is one, and its
    p-value where there is one (none over clustered points)."""
    if value is None:
        return "n/a"
    shown = f"{value:+.3f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
    return shown + (f" (p {p:.2g})" if p is not None else "")


def show_rho(c: dict) -> str:
    return show_correlation(c["spearman_rho"], c["spearman_p"], c.get("ci95"))


def show_tau(c: dict) -> str:
    return show_correlation(c["kendall_tau"], c["kendall_p"], c.get("kendall_ci95"))


def correlations_read(unit: str = "model") -> str:
    """What a table's intervals and p-values are, in its own words for a model (`unit`)."""
    return (f"95% intervals: bootstrap over {unit}s ({RESAMPLES} resamples, seed fixed); over ({unit}, image) points, "
            f"over {unit}s with all their images (a cluster bootstrap), and no p-value: a {unit}'s images share "
            "its index, so its points are not independent.")


def correlation_table(correlations: dict, names: Names) -> str:
    lines = ["| index | attack | over | n | Spearman's rho [95% CI] (p) | Kendall's tau [95% CI] (p) |",
             "|---|---|---|---|---|---|"]
    for index, by_attack in correlations.items():
        for attack, over in by_attack.items():
            for what, c in over.items():
                lines.append(f"| {INDICES[index]} | {names.shown(attack)} | {what} | {c['n']} | {show_rho(c)} | "
                             f"{show_tau(c)} |")
    return "\n".join(lines) + "\n\n" + correlations_read() + "\n"


# =============================================================================
# Summaries
# =============================================================================


def by_defence(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows by defence spec, in the order they come."""
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["defence"], []).append(row)
    return out


def undefended(rows: list[dict]) -> list[dict]:
    """The rows the indices' study reads: those without a defence, or a run's only defence's."""
    groups = by_defence(rows)
    return groups.get("none", next(iter(groups.values())) if len(groups) == 1 else [])


def summarise(rows: list[dict], names: Names) -> list[dict]:
    """Per defence, then per (model, attack): the model's security index over its images
    (mean, min, max) and its worst layer's fraction (mean), of the equations the attacker
    has; mean, std (n-1), median of PSNR and SSIM; label accuracy; seconds."""
    return [entry for defence, group in by_defence(rows).items() for entry in summarise_defence(group, defence, names)]


def summarise_defence(rows: list[dict], defence: str, names: Names) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["attack"]), []).append(row)
    order = {a: i for i, a in enumerate(names.attacks)}
    index, fraction = index_by_model(rows), index_by_model(rows, "worst_layer_fraction")
    out = []
    for (model, attack), group in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
        entry = {"model": model, "defence": defence, "attack": attack, "n": len(group)}
        if model in index:
            values = index[model]
            entry |= {"index_mean": np.mean(values), "index_min": min(values), "index_max": max(values)}
        if model in fraction:
            entry["fraction_mean"] = np.mean(fraction[model])
        for metric in ("psnr", "ssim"):
            values = np.array([r[metric] for r in group], dtype=float)
            with np.errstate(invalid="ignore"):  # exact reconstructions: infinite PSNR, its std undefined
                entry |= {f"{metric}_mean": values.mean(), f"{metric}_median": float(np.median(values)),
                          f"{metric}_std": values.std(ddof=1) if len(values) > 1 else 0.0}
        known = [r["label_correct"] for r in group if r["label_correct"] is not None]  # a label given
        entry["label_accuracy"] = np.mean(known) if known else math.nan
        entry["seconds_mean"] = np.mean([r["seconds"] for r in group])
        out.append({k: float(v) if isinstance(v, np.floating) else v for k, v in entry.items()})
    return out


def summary_table(summary: list[dict], names: Names) -> str:
    """summary.md's table: a row per (defence, model, attack)."""
    index = lambda e: f"{e['index_mean']:.0f} [{e['index_min']:.0f}, {e['index_max']:.0f}]" if "index_mean" in e else ""  # noqa: E731
    fraction = lambda e: f"{e['fraction_mean']:.4f}" if "fraction_mean" in e else ""  # noqa: E731
    defended = any(e["defence"] != "none" for e in summary)  # a column of its own only where there is one
    column = lambda e: f" {e['defence']} |" if defended else ""  # noqa: E731
    lines = ["| model |" + (" defence |" if defended else "") + " security index mean [min, max] | worst layer's "
             "fraction | attack | n | PSNR mean ± std | PSNR median | SSIM mean ± std | SSIM median | label acc. | "
             "seconds |", "|---" * (11 + defended) + "|"]
    scores = lambda e: (f"{e['psnr_mean']:.2f} ± {e['psnr_std']:.2f} | {e['psnr_median']:.2f} | "  # noqa: E731
                        f"{e['ssim_mean']:.3f} ± {e['ssim_std']:.3f} | {e['ssim_median']:.3f}"
                        if not math.isnan(e["ssim_mean"]) else "not scored | | not scored | ")  # no target given
    accuracy = lambda e: "-" if math.isnan(e["label_accuracy"]) else f"{e['label_accuracy']:.2f}"  # noqa: E731
    lines += [f"| {e['model']} |{column(e)} {index(e)} | {fraction(e)} | {names.shown(e['attack'])} | {e['n']} | "
              f"{scores(e)} | {accuracy(e)} | {e['seconds_mean']:.1f} |" for e in summary]
    return "\n".join(lines) + "\n"


def write_summary(folder: Path, rows: list[dict], names: Names, correlations: dict, notes: str = "",
                  by_defence_correlations: dict | None = None) -> str:
    """summary.csv and summary.md (with the index's correlations, those under each defence,
    then `notes`); returns the markdown."""
    summary = summarise(rows, names)
    if not summary:
        if notes:
            sweeps.write_atomic(folder / "summary.md", notes.lstrip())
        return notes
    sweeps.write_atomic(folder / "summary.csv", sweeps.csv_text(summary, dict.fromkeys(k for e in summary for k in e)))
    text = summary_table(summary, names)
    if len(index_by_model(undefended(rows))) >= 3:
        text += "\nThe indices against PSNR, rank correlations\n\n" + correlation_table(correlations, names)
    for spec, by_index in (by_defence_correlations or {}).items():
        text += (f"\nUnder {spec}: the indices of the equations the attacker has against PSNR\n\n"
                 + correlation_table(by_index, names))
    text += notes
    sweeps.write_atomic(folder / "summary.md", text)
    return text


# =============================================================================
# The figures of a run
# =============================================================================


def plot_comparison(cells: list[dict], folder: Path, path: Path, names: Names, budget: str = "") -> object:
    """One row per cell's entry (a batch's: one per image, the reconstructions in their paired
    order): Target then each attack, under each its PSNR / SSIM, the label it used where that
    is wrong or there is no target to score against, and which attack scored best (PSNR and
    SSIM can disagree); each row titled with the model, the image and a captured gradient's
    name; `budget` (the attacks' iterations) over the figure. As wide as the longest row
    title needs (a long file name over two columns). Returns the figure."""
    from matplotlib.figure import Figure

    columns = ["target"] + [a for a in names.attacks if any(a in cell["attacks"] for cell in cells)]
    lines = [(cell, image) for cell in cells for image in (range(cell["batch"]) if cell.get("batch") else [None])]
    label = lambda cell, image: cell["label"][image] if isinstance(cell["label"], list) else cell["label"]  # noqa: E731
    titles = ["  |  ".join([cell["model"], cell["image"],
                            *([cell["gradient"]] if cell.get("gradient") not in (None, cell["image"]) else []),
                            *([] if cell["defence"]["spec"] == "none" else [cell["defence"]["spec"]]),
                            *([] if image is None else [f"image {image + 1} of {cell['batch']}"]),
                            names.label(label(cell, image))])
              for cell, image in lines]
    width = max(1.7 * len(columns), 0.085 * max(map(len, titles + [budget])) + 0.4)  # 10 points: 0.08 in a character
    small, medium = (max(size, readable_points(width)) for size in (8, 9))  # readable at a README's width
    fig = Figure(figsize=(width, 2.35 * len(lines) + 0.3 * bool(budget)), layout="constrained")
    if budget:
        fig.suptitle(budget, fontsize=medium, color="0.3")
    rows = np.atleast_1d(fig.subfigures(len(lines), 1))
    for row, (cell, image), title in zip(rows, lines, titles):
        row.suptitle(title, fontsize=10)
        scores = {name: ({**e, **e.get("images", [{}] * (image + 1))[image]} if image is not None else e)
                  for name, e in cell["attacks"].items()}
        best = best_attacks(scores) if cell["target"] else {}
        for ax, name in zip(row.subplots(1, len(columns)), columns):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("Target" if name == "target" else names.shown(name), fontsize=medium)
            entry = cell["target"] if name == "target" else cell["attacks"].get(name)
            if entry is None:
                if name == "target":  # a captured gradient attacked with no image named
                    ax.text(0.5, 0.5, "no target\ngiven", ha="center", va="center", fontsize=small,
                            transform=ax.transAxes)
                ax.set_axis_off()
                continue
            pixels = np.load(folder / entry["npy"])
            if image is not None:  # a batch's: (B, H, W, C)
                entry = entry if name == "target" else {**entry, **entry.get("images", [{}] * (image + 1))[image]}
                pixels = pixels[image]
            if pixels.shape[-1] == 1:  # one channel (MNIST): gray, on the pixels' [0, 1]
                ax.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(pixels, interpolation="nearest")
            if name != "target":
                true = label(cell, image)
                used = entry.get("label")
                said = [f"{format_psnr(entry['psnr'])} / SSIM {entry['ssim']:.2f}" if cell["target"] else "not scored"]
                if used is not None and (true is None or used != true):
                    said.append(f"label {used}" + ("" if true is None else ", wrong"))
                if name in best:
                    said.append(best[name])
                ax.set_xlabel("\n".join(said), fontsize=small,
                              fontweight="bold" if name in best else "normal")
    fig.savefig(path, dpi=120)
    return fig


def best_attacks(scores: dict[str, dict]) -> dict[str, str]:
    """The attack with the highest PSNR and the one with the highest SSIM ("best PSNR",
    "best SSIM", or both), among those scored; ties name each."""
    out: dict[str, list[str]] = {}
    for shown, value in [("PSNR", lambda e: math.inf if e["psnr"] is None else e["psnr"]),
                         ("SSIM", lambda e: e["ssim"])]:
        scored_ = {name: value(e) for name, e in scores.items() if e.get("ssim") is not None}
        if scored_:
            top = max(scored_.values())
            for name, v in scored_.items():
                if v == top:
                    out.setdefault(name, []).append(shown)
    return {name: "best " + " and ".join(metrics) for name, metrics in out.items()}


def index_groups(index: dict[str, float]) -> dict[float, list[str]]:
    """Models by their (mean) index, the groups in index order."""
    groups: dict[float, list[str]] = {}
    for model, value in sorted(index.items(), key=lambda kv: (kv[1], kv[0])):
        groups.setdefault(value, []).append(model)
    return groups


def spread_labels(positions: list[float], gap: float) -> list[float]:
    """Label positions (axes fraction, sorted) near `positions`, at least `gap` apart."""
    out = list(positions)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + gap)
    if out and out[-1] > 1:
        out[-1] = 1
        for i in range(len(out) - 2, -1, -1):
            out[i] = min(out[i], out[i + 1] - gap)
    return out


README_PX, SMALLEST_PX = 880, 9  # a README's image width (GitHub's column), and the smallest text that reads there


def readable_points(width_in: float) -> float:
    """The font size (points) whose text stands SMALLEST_PX tall once a figure `width_in`
    inches wide is shown README_PX wide: wide figures (one label per model) need larger text."""
    return max(8.0, SMALLEST_PX * 72 * width_in / README_PX)


def label_groups(ax: object, groups: dict[float, list[str]], fmt: str = "{:.0f}", points: float = 9) -> None:
    """Above the axes, one label per index value naming its models (a family's common
    prefix once: "cnn3_c1 c6 c7"), spread apart, each with a line to its index."""
    to_fraction = ax.transAxes.inverted().transform
    at = [(to_fraction(ax.transData.transform((value, 0)))[0], value) for value in groups]
    width = ax.get_position().width * ax.figure.get_figwidth() * 72  # the axis, in points
    gap = min(1 / max(len(at), 1), 1.25 * points / width)  # a label's height apart, and some
    for (point, value), label in zip(at, spread_labels([p for p, _ in at], gap)):
        first, *others = groups[value]
        family = first.split("_")[0] + "_"
        text = short(" ".join([first] + [n.removeprefix(family) for n in others]))
        # the leader line from the label's foot (relpos), not its middle: it stays below every label
        ax.annotate(f"{text}  ({fmt.format(value)})", (point, 1.0), xytext=(label, 1.06), xycoords="axes fraction",
                    textcoords="axes fraction", rotation=90, fontsize=points, ha="center", va="bottom",
                    arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5", relpos=(0.5, 0.0), shrinkA=1, shrinkB=0))


def first_activations(rows: list[dict]) -> dict[str, str]:
    """model -> the activation after its first convolution, as its rows carry it."""
    return {r["model"]: r["first_activation"] for r in rows}


def activation_colours(activations: dict[str, str]) -> dict[str, str]:
    return {act: f"C{i}" for i, act in enumerate(sorted(set(activations.values())))}


def plot_points(ax: object, summary: list[dict], x: dict[str, float], metric: str, colour: dict[str, str],
                names: Names, worst: dict[tuple[str, str], float]) -> None:
    """Each attack's mean (± std over images, the bar kept within SSIM's bound of 1) per model
    at x[model]: marker by attack, colour by the first activation (`colour`: model -> colour);
    PSNRs above the cap drawn at it, hollow, with a line down to the worst image's where that
    is below the cap (`worst`: (model, attack) -> the lowest PSNR), so that no failure hides."""
    for e in summary:
        if e["model"] not in x:
            continue
        mean, std = e[f"{metric}_mean"], e[f"{metric}_std"]
        capped = metric == "psnr" and mean > PSNR_CAP
        c, at = colour[e["model"]], x[e["model"]]
        bar = None if capped else [[std], [min(std, 1 - mean) if metric == "ssim" else std]]
        ax.errorbar([at], [PSNR_CAP if capped else mean], bar, fmt=names.marker(e["attack"]), ms=5, capsize=2,
                    color=c, mfc="none" if capped else c, alpha=0.85, gid=f"{e['model']}|{e['attack']}|{metric}")
        low = worst.get((e["model"], e["attack"]), math.inf)
        if capped and low < PSNR_CAP:
            ax.plot([at, at], [PSNR_CAP, low], color=c, lw=0.8, ls=":", alpha=0.85)
            ax.plot([at], [low], marker="v", ms=4, color=c, alpha=0.85)


def study_legend(fig: object, attacks: list[str], activations: dict[str, str], names: Names,
                 points: float = 8) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="none", marker=names.marker(a), color="0.3", label=names.shown(a)) for a in attacks]
    handles += [Line2D([], [], ls="none", marker="o", color=c, label=f"first activation: {act}")
                for act, c in activation_colours(activations).items()]
    handles.append(Line2D([], [], ls="none", marker="o", mfc="none", color="0.3",
                          label=f"mean above {PSNR_CAP:.0f} dB, drawn at it; v: its worst image, where below"))
    handles.append(Line2D([], [], marker="|", ms=10, color="0.3", ls="none", label="bars: ± 1 std over the images"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=points)


def negative_index_axis(column: object, below: dict[float, list[str]], which: str, points: float = 9) -> None:
    """The x axis of the negative values: symmetric-log for the paper's index (counts of
    free unknowns, from tens to thousands), linear for the worst layer's fraction."""
    top, bottom = column
    if which == "security_index":
        top.set_xscale("symlog", linthresh=1)
        lo, hi = min(below) * 1.6, max(below) / 1.6
        top.set_xlim(lo, hi)
        ticks = [-m * 10**k for k in range(6) for m in (1, 2, 5) if lo <= -m * 10**k <= hi]
        bottom.set_xticks(ticks, [f"{t:g}" for t in ticks])
        bottom.minorticks_off()
        bottom.set_xlabel("the paper's security index < 0 (symmetric-log axis; more negative: more of the "
                          "input left free)")
    else:
        span = max(below) - min(below) or 0.1
        top.set_xlim(min(below) - 0.05 * span, max(below) + 0.05 * span)
        bottom.set_xlabel("the worst layer's fraction of free unknowns, min_l r_l / n_l < 0 (-1: some layer "
                          "determines nothing)")
    label_groups(top, below, "{:.0f}" if which == "security_index" else "{:.3f}", points)


LABEL_CHARACTERS = 32  # a model's name in a figure: longer ones (architecture strings) are cut, marked '…'


def short(name: str) -> str:
    return name if len(name) <= LABEL_CHARACTERS else name[:LABEL_CHARACTERS - 1] + "…"


def zero_strip(column: object, zero: list[str], which: str, points: float = 8) -> None:
    """The strip of index 0 (every layer determined): its models side by side, named."""
    top, bottom = column
    bottom.set_xlim(-0.6, len(zero) - 0.4)
    bottom.set_xticks(range(len(zero)), [short(m) for m in zero], rotation=90, fontsize=points)
    top.tick_params(labelbottom=False)
    top.set_title(f"{INDICES[which]} 0\n(every layer determined)", fontsize=points)
    bottom.set_xlabel("index 0: models side by side")


def plot_index_vs_quality(rows: list[dict], path: Path, names: Names, which: str = "security_index") -> object:
    """The study figure: each model's index (x; `which` of INDICES) against each attack's mean
    PSNR and SSIM over its images, +- their standard deviation. The index as it is, never
    jittered: negative values on a symmetric-log axis (the paper's index) or a linear one
    (the worst layer's fraction), models of one value sharing its x and one label above; 0
    (every layer determined) in a strip of its own at the right, where its models stand side
    by side, named. Returns the figure."""
    import matplotlib

    summary = summarise(rows, names)
    index = {m: float(np.mean(v)) for m, v in index_by_model(rows, which).items()}
    zero = sorted(m for m, v in index.items() if v == 0)
    below = index_groups({m: v for m, v in index.items() if v != 0})
    width = max(11, 0.35 * len(index))
    points = readable_points(width)
    with matplotlib.rc_context({"font.size": points}):  # every text readable at a README's width
        return study_figure(summary, index, zero, below, rows, path, names, which, width, points)


def study_figure(summary: list[dict], index: dict[str, float], zero: list[str], below: dict[float, list[str]],
                 rows: list[dict], path: Path, names: Names, which: str, width: float, points: float) -> object:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 10 * points / 7.5), layout="constrained")  # room for the larger labels
    ratios = [w for w in (3 if below else 0, 0.12 * len(zero) + 0.3 if zero else 0) if w]
    axes = fig.subplots(2, len(ratios), sharey="row", sharex="col", squeeze=False, width_ratios=ratios)
    activations = {m: act for m, act in first_activations(rows).items() if m in index}
    palette = activation_colours(activations)
    colour = {m: palette[act] for m, act in activations.items()}
    worst = {key: min(r["psnr"] for r in group) for key, group in grouped(rows, "model", "attack").items()}
    for row, (metric, label) in enumerate((("psnr", "PSNR (dB)"), ("ssim", "SSIM"))):
        if below:
            plot_points(axes[row, 0], summary, {m: v for v, ms in below.items() for m in ms}, metric, colour, names,
                        worst)
        if zero:
            plot_points(axes[row, -1], summary, {m: i for i, m in enumerate(zero)}, metric, colour, names, worst)
        axes[row, 0].set_ylabel(label)
        for ax in axes[row]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylim(top=PSNR_CAP + 2)
    if below:
        negative_index_axis(axes[:, 0], below, which, points)
    if zero:
        zero_strip(axes[:, -1], zero, which, points)
    study_legend(fig, names.present(summary), activations, names, points)
    fig.savefig(path, dpi=130)
    return fig


LINE_STYLES = ("-", "--", ":", "-.")  # the curves of one kind (dp at each clip C), one style each


def plot_defence_vs_quality(rows: list[dict], path: Path, names: Names) -> object:
    """PSNR and SSIM against each defence's strength: one column per kind of defence, one
    line per (model, attack) through the mean over images, colour by attack, marker by
    model; no defence at strength 0 on every panel. PSNRs above the cap drawn at it."""
    from matplotlib.figure import Figure

    # (kind, curve, model, attack, metric) -> strength -> values over images: a point is one
    # defence's, never a mean over defences that share a strength (dp:1:0.1 and dp:0.1:1)
    curves: dict[tuple, dict[float, list[float]]] = {}
    lines = {(r["kind"], r["curve"]) for r in rows if r["kind"] != "none"}
    for r in rows:
        on = [(r["kind"], r["curve"])] if r["kind"] != "none" else lines  # none: at 0 on every curve
        for (k, c) in on:
            for metric in ("psnr", "ssim"):
                value = min(r[metric], PSNR_CAP) if metric == "psnr" else r[metric]
                curves.setdefault((k, c, r["model"], r["attack"], metric), {}).setdefault(r["strength"], []).append(
                    value)
    present = {r["kind"] for r in rows}
    kinds = [k for k in names.strengths if k in present]
    models = list(dict.fromkeys(r["model"] for r in rows))
    attacks = names.present(rows)
    fig = Figure(figsize=(4.5 * len(kinds) + 2, 7.5), layout="constrained")
    axes = fig.subplots(2, len(kinds), sharey="row", squeeze=False)
    markers = "osD^vP*Xh<>"
    for col, kind in enumerate(kinds):
        for row, (metric, label) in enumerate((("psnr", "PSNR (dB)"), ("ssim", "SSIM"))):
            ax = axes[row, col]
            for m, model in enumerate(models):
                for a, attack in enumerate(attacks):
                    for c, which in enumerate(sorted(w for k, w in lines if k == kind)):
                        curve = sorted((x, np.mean(v)) for x, v in
                                       curves.get((kind, which, model, attack, metric), {}).items())
                        if curve:
                            ax.plot(*zip(*curve), marker=markers[m % len(markers)], ms=4, lw=1, alpha=0.8,
                                    color=f"C{a}", ls=LINE_STYLES[c % len(LINE_STYLES)],
                                    label=", ".join([names.shown(attack), model] + [which] * bool(which)))
            if kind != "prune":  # noise levels span decades; none (0) stays on the linear part
                positive = [x for (k, *_), c in curves.items() if k == kind for x in c if x > 0]
                ax.set_xscale("symlog", linthresh=min(positive, default=1) / 2)
            ax.grid(alpha=0.3)
            axes[row, 0].set_ylabel(label)
        axes[0, col].set_title(kind)
        axes[1, col].set_xlabel(names.strengths[kind][0])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    fig.savefig(path, dpi=130)
    return fig


def plot_pruned_index_vs_quality(rows: list[dict], path: Path, names: Names, kinds: set[str]) -> object:
    """Under the defences that remove equations (`kinds`: pruning), the indices of the
    surviving equations (x) against PSNR, one point per cell and attack: colour by the
    defence's strength (none: 0), marker by attack."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    kept = [r for r in rows if r["kind"] in kinds | {"none"}]
    fig = Figure(figsize=(12, 5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    colour = colormaps["viridis"]
    for ax, index in zip(axes, INDICES):
        for attack in names.present(kept):
            points = [r for r in kept if r["attack"] == attack and r.get(index) is not None]
            ax.scatter([r[index] for r in points], [min(r["psnr"], PSNR_CAP) for r in points],
                       c=[colour(r["strength"]) for r in points], marker=names.marker(attack),
                       s=18, alpha=0.8, label=names.shown(attack))
        if index == "security_index":
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel(f"{INDICES[index]} of the surviving equations")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR (dB)")
    axes[0].legend(fontsize=8)
    fig.colorbar(ScalarMappable(cmap=colour), ax=axes,
                 label=" or ".join(names.strengths[k][0] for k in names.strengths if k in kinds))
    fig.savefig(path, dpi=130)
    return fig


# =============================================================================
# What a sweep and a merge end with
# =============================================================================


BUDGETS = {"dlg": ("dlg_iters", "{} steps"), "idlg": ("dlg_iters", "{} steps"), "cosine": ("cosine_iters", "{} steps"),
           "hybrid": (("hybrid_iters_first", "hybrid_iters"), "N0 {} N {}"),
           "hybrid_free": (("hybrid_iters_first", "hybrid_iters"), "N0 {} N {}")}


def budget_text(config: dict, names: Names) -> str:
    """The attacks' iterations as the run had them, and "below the paper's (--quick?)" where
    any is (names.budget: the paper's): a smoke test's noise is not a result."""
    parts, below = [], False
    for attack in config.get("attacks", []):
        if attack not in BUDGETS:
            continue
        keys, form = BUDGETS[attack]
        keys = (keys,) if isinstance(keys, str) else keys
        if not all(k in config for k in keys):
            continue
        parts.append(f"{names.shown(attack)} {form.format(*(config[k] for k in keys))}")
        below |= any(config[k] < names.budget.get(k, 0) for k in keys)
    if config.get("restarts", 1) > 1:
        parts.append(f"best of {config['restarts']} starts")
    return ("; ".join(parts) + ("  (below the paper's budget: --quick?)" if below else "")) if parts else ""


def finish(folder: sweeps.RunFolder, names: Names, removes_equations: set[str]) -> None:
    """The figures (the first cells of a sweep; the index against quality for 3 or more
    models; the defences'), the summary tables and the index's correlations, printed and in
    results.json; what a partial merge lacks, and what was skipped, said at the end of
    summary.md. `removes_equations`: the defence kinds under which the attacker drops
    equations (their own figure)."""
    shown = [e for e in folder.results["runs"] if e.get("attacks")][:FIGURE_CELLS]
    if shown:
        plot_comparison(shown, folder.path, folder.path / "comparison.png", names,
                        budget_text(folder.results.get("config", {}), names))
    rows = folder.rows()
    groups, plain = by_defence(rows), undefended(rows)
    folder.results["correlations"] = index_correlations(plain, names)
    if len(groups) > 1:  # the indices of the equations the attacker has, under each defence
        folder.results["correlations_by_defence"] = {spec: c for spec, group in groups.items()
                                                     if spec != "none" and (c := index_correlations(group, names))}
    folder.save()
    for which, name in INDEX_FIGURES.items():
        if len(index_by_model(plain, which)) >= 3:
            plot_index_vs_quality(plain, folder.path / name, names, which)
    if len(groups) > 1:
        plot_defence_vs_quality(rows, folder.path / "defence_vs_quality.png", names)
    if any(r["kind"] in removes_equations for r in rows):
        plot_pruned_index_vs_quality(rows, folder.path / "pruned_index_vs_quality.png", names, removes_equations)
    notes, missing = [], folder.results.get("missing")
    if missing:
        notes.append(f"\n{len(missing)} cells are missing from this partial merge: "
                     f"{'; '.join(' on '.join(k) for k in missing)}\n")
    notes += [f"\nSkipped on {e['model']} on {e['image']}: {', '.join(e['skipped'])} "
              f"({next(iter(e['skipped'].values()))})\n" for e in folder.results["runs"] if e.get("skipped")]
    notes += [f"\nNo target was given for {e['model']} on {e['image']}: its reconstructions are saved, not scored. "
              f"Rank deficiency per layer {e.get('rank_deficiency')}, security index {e.get('security_index')}, "
              f"worst layer's fraction {fraction_text(e.get('worst_layer_fraction'))}.\n"
              for e in folder.results["runs"] if not scored(e)]
    summary = write_summary(folder.path, rows, names, folder.results["correlations"], "".join(notes),
                            folder.results.get("correlations_by_defence"))
    say(summary, end="")
    say(f"results: {folder.path}")


def grouped(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out
