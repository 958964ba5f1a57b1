"""Tabulates the peers' own setting (studies/make_peers.sh): DLG's LeNet, weights
uniform(-0.5, 0.5), on the test images of MNIST and CIFAR-100 that foolbox ships. For each
dataset: the label accuracy of every attack beside iDLG's published table (Zhao et al.,
2020, Table 1: DLG 89.9% on MNIST and 83.3% on CIFAR-100, iDLG 100% on both), each
attack's PSNR and SSIM over the images, and the model's rank deficiencies and indices.

Usage: python -m studies.peers_table MNIST.json CIFAR100.json > table.md
"""
import sys

import numpy as np

from leakage import report, tables
from leakage.data import DATASETS, dataset_of
from leakage.record import report_names, rows_in
from studies.common import Parser, printed, read_results

PUBLISHED = {"dlg": {"mnist": 0.899, "cifar100": 0.833}, "idlg": {"mnist": 1.0, "cifar100": 1.0}}  # iDLG, Table 1


def accuracy(right: list[bool]) -> str:
    """'18/20 (90% [68, 99])': the count, the share and its exact (Clopper-Pearson) 95% interval."""
    from scipy import stats

    k, n = int(sum(right)), len(right)
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
    return f"{k}/{n} ({k / n:.0%} [{ci.low:.0%}, {ci.high:.0%}])"


def share(right: list[bool]) -> str:
    """'74/80 (92.5%)': the count and the share, with no interval (for counts whose trials are
    not independent: a binomial interval would be too narrow)."""
    k, n = int(sum(right)), len(right)
    return f"{k}/{n} ({k / n:.1%})"


def dataset(results: dict) -> str:
    return dataset_of(results["config"]["source"])[0]


def label_table(runs: dict[str, list[dict]], results: dict[str, dict], names: report.Names) -> list[str]:
    """Each attack's label accuracy (the best start's, with --restarts), and DLG's own start by
    start: its label is its soft label's argmax, and each start finds its own."""
    data = list(runs)
    lines = ["| attack (DLG and iDLG: the best of 4 starts) | " + " | ".join(
        f"{DATASETS[d].shown}: ours [95% CI] | published" for d in data) + " |",
             "|---|" + "---|---|" * len(data)]
    for attack in names.present([r for rows in runs.values() for r in rows]):
        cells = []
        for d, rows in runs.items():
            mine = [r["label_correct"] for r in rows if r["attack"] == attack]
            published = PUBLISHED.get(attack, {}).get(d)
            cells += [accuracy(mine),
                      "-" if published is None else f"{published:.1%}"]
        lines.append(f"| {names.shown(attack)} | " + " | ".join(cells) + " |")
    for which, pick, shown in (("first start alone (the paper's single run)", lambda starts: starts[:1], accuracy),
                               ("every start (4 to an image: no interval, the starts of an image are not independent)",
                                lambda starts: starts, share)):
        cells = []
        for d, res in results.items():
            labels = [(s["label"], e["label"]) for e in res["runs"] if "dlg" in e.get("attacks", {})
                      for s in pick(e["attacks"]["dlg"].get("starts", []))]
            published = PUBLISHED["dlg"][d]
            cells += [shown([a == b for a, b in labels]) if labels else "-", f"{published:.1%}"]
        lines.append(f"| DLG, {which} | " + " | ".join(cells) + " |")
    return lines


def quality_table(runs: dict[str, list[dict]], names: report.Names) -> list[str]:
    data = list(runs)
    lines = ["| attack | " + " | ".join(f"{DATASETS[d].shown}: PSNR median [min, max] | SSIM mean | seconds"
                                        for d in data) + " |", "|---|" + "---|---|---|" * len(data)]
    for attack in names.present([r for rows in runs.values() for r in rows]):
        cells = []
        for rows in runs.values():
            mine = [r for r in rows if r["attack"] == attack]
            psnr = [r["psnr"] for r in mine]
            cells += [f"{tables.show_psnr(float(np.median(psnr)))} [{tables.show_psnr(min(psnr))}, "
                      f"{tables.show_psnr(max(psnr))}]", f"{np.mean([r['ssim'] for r in mine]):.3f}",
                      f"{np.mean([r['seconds'] for r in mine]):.1f}"]
        lines.append(f"| {names.shown(attack)} | " + " | ".join(cells) + " |")
    return lines


def rank_table(results: dict[str, dict]) -> list[str]:
    lines = ["| data | model | images | rank deficiency per layer (each image's) | security index | worst layer's "
             "fraction |", "|---|---|---|---|---|---|"]
    for d, res in results.items():
        entries = [e for e in res["runs"] if e.get("rank_deficiency") is not None]
        ranks = sorted({tuple(e["rank_deficiency"]) for e in entries})
        index = [e["security_index"] for e in entries]
        fraction = [e["worst_layer_fraction"] for e in entries]
        lines.append(f"| {DATASETS[d].shown} | {entries[0]['architecture']} | {len(entries)} | "
                     f"{'; '.join(str(list(r)) for r in ranks)} | {min(index)} to {max(index)} | "
                     f"{min(fraction):.4f} to {max(fraction):.4f} |")
    return lines


LABELS = ("Label accuracy (the published: iDLG's Table 1, over many more images; ours over 20, with exact "
          "binomial intervals)")


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.peers_table")
    p.add_argument("results", nargs="+", help="a results.json of studies/make_peers.sh per dataset")
    a = p.parse_args(argv)

    def make() -> str:
        results = {}
        for path in a.results:
            res = read_results(path)
            results[dataset(res)] = res
        runs = {d: rows_in(res) for d, res in results.items()}
        names = report_names()
        return "\n".join([LABELS, "", *label_table(runs, results, names), "",
                          "Reconstruction quality over the images", "", *quality_table(runs, names), "",
                          "The model on each dataset", "", *rank_table(results)]) + "\n"
    return printed(p.prog, make)


if __name__ == "__main__":
    sys.exit(main())
