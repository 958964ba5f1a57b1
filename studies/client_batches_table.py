"""Tabulates the batch study (studies/make_client_batches.sh): DLG's LeNet, weights
uniform(-0.5, 0.5), on the test images of MNIST and CIFAR-100 that foolbox ships, in client
batches of 4. For each dataset: the labels counted from each batch's gradient (iDLG's, the
attacker's count) against the truth, in iLRG's two measures beside iLRG's published ones (Ma et
al., ICLR 2023, on other models: LeNet-5 on CIFAR-100 and FCN-3 on MNIST); then every image's
PSNR under DLG and iDLG, paired with its reconstruction, and the count at 40 dB or above.

Usage: python -m studies.client_batches_table MNIST.json CIFAR100.json > table.md
"""
import re
import sys

import numpy as np

from leakage.data import DATASETS, dataset_of
from leakage.labels import label_accuracies
from studies.common import Parser, Refused, printed, read_results

# iLRG's table, batch size 4 (existence, number), on its own models: not DLG's LeNet.
PUBLISHED = {"mnist": ("FCN-3", 1.000, 0.994), "cifar100": ("LeNet-5", 1.000, 1.000)}
EXACT_DB = 40.0
ATTACKS = ("dlg", "idlg")


def psnr_text(value: float | None) -> str:
    return "exact" if value is None else f"{value:.1f}"


def dataset_table(results: dict) -> list[str]:
    first = lambda r: int(m[1]) if (m := re.search(r":(\d+)", r["image"])) else -1  # noqa: E731  (batches in order)
    runs = sorted(results["runs"], key=lambda r: (first(r), r["image"]))
    if not all(r.get("batch") for r in runs):
        raise Refused("a run without --batch: this table reads client batches")
    counted = [label_accuracies(r["attacks"]["idlg"]["label"], r["label"]) for r in runs if "idlg" in r["attacks"]]
    lines = ["| batch | true labels | counted (iDLG's) | existence | number | "
             + " | ".join(f"{a.upper() if a == 'dlg' else 'iDLG'}: PSNR of each image (dB) | labels right"
                          for a in ATTACKS) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(ATTACKS)]
    for r, acc in zip(runs, counted):
        cells = []
        for a in ATTACKS:
            e = r["attacks"].get(a)
            cells += (["-", "-"] if e is None else
                      [", ".join(psnr_text(i["psnr"]) for i in e["images"]), f"{e['label_correct']:.0%}"])
        lines.append(f"| {r['image']} | {sorted(r['label'])} | {sorted(r['attacks']['idlg']['label'])} | "
                     f"{acc['existence']:.2f} | {acc['number']:.2f} | " + " | ".join(cells) + " |")
    model, existence, number = PUBLISHED[dataset_of(results["config"]["source"])[0]]
    existence_mean, number_mean = (np.mean([c[k] for c in counted]) for k in ("existence", "number"))
    lines += ["", f"Label counts over {len(counted)} batches: existence {existence_mean:.3f}, number {number_mean:.3f} "
                  f"(iLRG's published, {model}, batch 4: "
                  f"{existence:.3f} and {number:.3f})."]
    for a in ATTACKS:
        each = [i["psnr"] for r in runs for i in r["attacks"].get(a, {}).get("images", [])]
        exact = sum(p is None or p >= EXACT_DB for p in each)
        finite = [p for p in each if p is not None]
        lines.append(f"{'DLG' if a == 'dlg' else 'iDLG'}: {exact} of {len(each)} images at {EXACT_DB:.0f} dB or above; "
                     f"median PSNR {np.median(finite) if finite else float('nan'):.1f} dB.")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.client_batches_table")
    p.add_argument("results", nargs="+", help="a results.json of studies/make_client_batches.sh per dataset")
    a = p.parse_args(argv)

    def make() -> str:
        out = []
        for path in a.results:
            results = read_results(path, "idlg")
            name = dataset_of(results["config"]["source"])[0]
            out += [f"### {DATASETS[name].shown}: {len(results['runs'])} batches of {results['config']['batch']}",
                    "", f"`{results['command']}` at commit {results['commit']}", "", *dataset_table(results), ""]
        return "\n".join(out)
    return printed(p.prog, make)


if __name__ == "__main__":
    sys.exit(main())
