"""Tabulates hybrid_free (ours) against R-GAP and the paper's hybrid on the zoo: per model,
the mean PSNR of each over the images, which layers the variant corrected, and on how many
(model, image) pairs it is at least max(R-GAP, hybrid) - 0.5 dB; then the same count over
every pair, for each rule, and each index's rank correlation with each attack's PSNR.

The first results.json holds rgap, hybrid and hybrid_free (the default rule,
free-at-or-above); any further one holds hybrid_free run with another --correct-where on
some of the models and the same images (compared on those pairs only).

Usage: python -m studies.variant_table STUDY.json [OTHER_RULE.json ...] [--images 0-4] > table.md
"""
import math
import sys

import numpy as np

from leakage import report
from leakage.record import report_names, rows_in
from studies.common import Parser, Refused, image_names, printed, read_results

MARGIN = 0.5  # dB: "at least as good" allows this much below the better of the two


def psnr(entry: dict, attack: str) -> float:
    value = entry["attacks"][attack]["psnr"]
    return math.inf if value is None else value  # null: an exact reconstruction


def entries(path: str, images: set[str] | None, attacks: tuple[str, ...] = ("hybrid_free",)
            ) -> tuple[str, dict[tuple[str, str], dict]]:
    """A run's rule and its entries by (model, image), each holding `attacks`; Refused where none is left."""
    run = read_results(path, "hybrid_free")
    rule = run["config"].get("correct_where", "free-at-or-above")
    kept = {(e["model"], e["image"]): e for e in run["runs"]
            if (images is None or e["image"] in images) and set(attacks) <= e.get("attacks", {}).keys()}
    if not kept:
        raise Refused(f"{path}: no (model, image) of the images asked for holds {', '.join(attacks)}")
    return rule, kept


def good_enough(variant: float, rgap: float, hybrid: float) -> bool:
    return variant >= max(rgap, hybrid) - MARGIN


def show(value: float) -> str:
    return "exact" if math.isinf(value) else f"{value:.2f}"


def table(study: str, others: list[str], images: set[str] | None) -> str:
    rule, pairs = entries(study, images, ("rgap", "hybrid", "hybrid_free"))
    runs = dict([(rule, pairs), *(entries(path, images) for path in others)])  # rule -> its entries
    rules = {r: {k: psnr(e, "hybrid_free") for k, e in run.items()} for r, run in runs.items()}
    models = list(dict.fromkeys(m for m, _ in pairs))
    n_images = len({i for _, i in pairs})
    lines = [f"{len(models)} models x {n_images} images. PSNR (dB): mean over the images (exact: every image "
             f"reconstructed to float64 rounding); ok: pairs where the variant is at least max(R-GAP, hybrid) - "
             f"{MARGIN} dB.", "",
             "| model | rank deficiency (image 0) | R-GAP | hybrid | " +
             " | ".join(f"hybrid_free, {r} | corrected layers | ok" for r in rules) + " |",
             "|---|---|---|---|" + "---|---|---|" * len(rules)]
    for m in models:
        keys = [k for k in pairs if k[0] == m]
        first = pairs[keys[0]]
        cells = [m, str(first.get("rank_deficiency")), show(np.mean([psnr(pairs[k], "rgap") for k in keys])),
                 show(np.mean([psnr(pairs[k], "hybrid") for k in keys]))]
        for r, values in rules.items():
            have = [k for k in keys if k in values]
            if not have:
                cells += ["", "", ""]
                continue
            ok = sum(good_enough(values[k], psnr(pairs[k], "rgap"), psnr(pairs[k], "hybrid")) for k in have)
            layers = runs[r][have[0]]["attacks"]["hybrid_free"].get("corrected_layers")
            cells += [show(np.mean([values[k] for k in have])), str(layers), f"{ok}/{len(have)}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| rule | pairs | ok | models where every pair is ok |", "|---|---|---|---|"]
    for r, values in rules.items():
        have = [k for k in pairs if k in values]
        ok = {k: good_enough(values[k], psnr(pairs[k], "rgap"), psnr(pairs[k], "hybrid")) for k in have}
        by_model = {m for m, _ in have}
        whole = sum(all(v for (mm, _), v in ok.items() if mm == m) for m in by_model)
        lines.append(f"| {r} | {len(have)} | {sum(ok.values())} ({100 * sum(ok.values()) / len(have):.0f}%) | "
                     f"{whole} of {len(by_model)} |")
    rows = [r for r in rows_in({"runs": list(pairs.values())}) if r["attack"] in ("rgap", "hybrid", "hybrid_free")]
    lines += ["", "The indices against PSNR (the default rule), rank correlations", "",
              report.correlation_table(report.index_correlations(rows, report_names()), report_names()).rstrip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.variant_table")
    p.add_argument("study")
    p.add_argument("others", nargs="*")
    p.add_argument("--images", help="CIFAR-10 test indices to keep, e.g. 0-4")
    a = p.parse_args(argv)
    return printed(p.prog, lambda: table(a.study, a.others, image_names(a.images)))


if __name__ == "__main__":
    sys.exit(main())
