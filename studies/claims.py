"""Every number the README states of the committed studies beyond their tables, computed
from the committed runs, each with its test where it is a comparison: exactness (one PSNR
threshold, EXACT_DB), whether the security index orders the rank-deficient models, what
hybrid_free's rule decides and where it is informative, the label read from the gradient
under each defence, and the activations (Kruskal-Wallis over architectures).

Usage: python -m studies.claims > assets/claims.md   (run from the repository root)
"""
import sys

import numpy as np
from scipy import stats

from leakage import report
from leakage.attacks import ATTACKS
from leakage.defences import parse_defence
from leakage.record import rows_in
from studies.common import Parser, printed, read_results

EXACT_DB = 40.0  # PSNR at or above which a reconstruction is called exact, here and in the README
STUDY, HELDOUT = "assets/study_cifar_random.json", "assets/heldout.json"
DEFENCES = [f"assets/defences_{part}_results.json" for part in ("linear", "linear_bends", "baselines", "cosine")]


def per_model(rows: list[dict], attack: str) -> dict[str, list[dict]]:
    """One attack's rows by model."""
    return {model: group for (model,), group in report.grouped([r for r in rows if r["attack"] == attack],
                                                               "model").items()}


def exactness(rows: list[dict], name: str) -> list[str]:
    """Index-0 models: on how many images R-GAP is exact; the deficient ones' best image."""
    lines = []
    models = per_model(rows, "rgap")
    zero = {m: g for m, g in models.items() if g[0]["security_index"] == 0}
    exact = {m: sum(r["psnr"] >= EXACT_DB for r in g) for m, g in zero.items()}
    everywhere = [m for m, g in zero.items() if exact[m] == len(g)]
    lines.append(f"- {name}: {len(everywhere)} of the {len(zero)} index-0 models give R-GAP an exact answer "
                 f"(≥ {EXACT_DB:g} dB) on every image, PSNR {min(r['psnr'] for m in everywhere for r in zero[m]):.1f} "
                 f"dB at least.")
    for m in sorted(set(zero) - set(everywhere)):
        misses = sorted((r["psnr"], r["image"]) for r in zero[m] if r["psnr"] < EXACT_DB)
        lines.append(f"  - {m}: exact on {exact[m]} of {len(zero[m])}; not on "
                     + ", ".join(f"{i} ({p:.1f} dB)" for p, i in misses) + ".")
    deficient = max(r["psnr"] for g in models.values() if g[0]["security_index"] < 0 for r in g)
    lines.append(f"  - The best R-GAP image of any rank-deficient model: {deficient:.1f} dB.")
    return lines


def ordering(rows: list[dict], name: str) -> list[str]:
    """Spearman's rho of the index with mean PSNR over the rank-deficient models alone."""
    lines = []
    for attack in ("rgap", "hybrid"):
        models = {m: g for m, g in per_model(rows, attack).items() if g[0]["security_index"] < 0}
        c = report.rank_correlation([np.mean([r["security_index"] for r in g]) for g in models.values()],
                                    [np.mean([r["psnr"] for r in g]) for g in models.values()], list(models))
        lines.append(f"- {name}, {ATTACKS[attack].shown}, over the {c['n']} rank-deficient models: "
                     f"{report.show_rho(c)}.")
    return lines


def free_rule(rows: list[dict], name: str) -> list[str]:
    """Where hybrid_free equals the hybrid or R-GAP to the bit, and on the rest (the informative
    pairs), how often it is within 0.5 dB of the better of the two, or above."""
    by = {(r["model"], r["image"], r["attack"]): r["psnr"] for r in rows}
    pairs = sorted({(m, i) for m, i, a in by if a == "hybrid_free"})
    as_hybrid = [p for p in pairs if by[(*p, "hybrid_free")] == by[(*p, "hybrid")]]
    as_rgap = [p for p in pairs if p not in as_hybrid and by[(*p, "hybrid_free")] == by[(*p, "rgap")]]
    rest = [p for p in pairs if p not in as_hybrid and p not in as_rgap]
    near = [p for p in rest if by[(*p, "hybrid_free")] >= max(by[(*p, "hybrid")], by[(*p, "rgap")]) - 0.5]
    misses = [p for p in pairs if by[(*p, "hybrid_free")] < max(by[(*p, "hybrid")], by[(*p, "rgap")]) - 0.5]
    return [f"- {name}: of {len(pairs)} pairs, hybrid_free is the hybrid to the bit on {len(as_hybrid)}, R-GAP to "
            f"the bit on {len(as_rgap)}; on the other {len(rest)} it is within 0.5 dB of the better of the two, or "
            f"above, on {len(near)}. Of all {len(pairs)}, within 0.5 dB or above on {len(pairs) - len(misses)}; "
            "below: " + ("; ".join(f"{m} on {i}" for m, i in misses) or "none") + "."]


def labels(rows: list[dict]) -> list[str]:
    """The label each attack used against the true one, per defence kind, and per defence
    where any was wrong."""
    groups = ((("rgap", "hybrid"), "R-GAP and the hybrid"), (("idlg", "cosine"), "iDLG and Cosine+TV"),
              (("dlg",), "DLG (its own)"))

    def wrong(rs: list[dict]) -> str:
        cells = []
        for attacks, shown in groups:
            mine = [r["label_correct"] for r in rs if r["attack"] in attacks]
            if mine:
                cells.append(f"{shown} wrong on {len(mine) - sum(mine)} of {len(mine)}")
        return "; ".join(cells)

    lines = []
    for kind in ("none", "noise", "prune", "dp"):
        lines.append(f"- {kind}: {wrong([r for r in rows if r['kind'] == kind])}.")
        specs = sorted({r["defence"] for r in rows if r["kind"] == kind and r["attack"] != "dlg"
                        and not r["label_correct"]}, key=lambda spec: parse_defence(spec).strength)
        lines += [f"  - {spec}: {wrong([r for r in rows if r['defence'] == spec])}." for spec in specs]
    return lines


def activations(rows: list[dict], name: str) -> list[str]:
    """Kruskal-Wallis over the rank-deficient architectures' mean PSNR, grouped by the
    activation after their first convolution: does it matter at all?"""
    lines = []
    for attack in ("rgap", "hybrid", "hybrid_free"):
        groups: dict[str, list[float]] = {}
        for g in per_model(rows, attack).values():
            if g[0]["security_index"] < 0:
                groups.setdefault(g[0]["first_activation"], []).append(float(np.mean([r["psnr"] for r in g])))
        if len(groups) < 2:
            continue
        h, p = stats.kruskal(*groups.values())
        medians = ", ".join(f"{act} {np.median(v):.1f} dB (n {len(v)})" for act, v in sorted(groups.items()))
        lines.append(f"- {name}, {ATTACKS[attack].shown}: Kruskal-Wallis H {h:.2f}, p {p:.2g}; medians {medians}.")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.claims")
    p.parse_args(argv)

    def make() -> str:
        study, heldout = (report.undefended(rows_in(read_results(f))) for f in (STUDY, HELDOUT))
        zoo_five = [r for r in study if int(r["image"].split(":")[1]) < 5]
        defended = [r for f in DEFENCES for r in rows_in(read_results(f))]
        sections = [
            (f"Exact: PSNR ≥ {EXACT_DB:g} dB", exactness(study, "The CIFAR-10 study (35 models x 20 images)")
             + exactness(heldout, "Held out (40 architectures x 5 images)")),
            ("Does the security index order the rank-deficient models? (Spearman's rho, bootstrap interval)",
             ordering(study, "The CIFAR-10 study") + ordering(heldout, "Held out")),
            ("hybrid_free's rule", free_rule(zoo_five, "The zoo, images 0-4") + free_rule(heldout, "Held out")),
            ("The label read from the gradient, under each defence kind (the defence study)", labels(defended)),
            ("The first activation (rank-deficient architectures; one mean PSNR each)",
             activations(study, "The CIFAR-10 study") + activations(heldout, "Held out")),
        ]
        return "\n".join(f"## {title}\n\n" + "\n".join(lines) + "\n" for title, lines in sections)
    return printed(p.prog, make)


if __name__ == "__main__":
    sys.exit(main())
