"""Tabulates the held-out test of the indices (studies/make_heldout.sh) beside the zoo: for
each index and attack, Spearman's rho and Kendall's tau (two-sided p) with PSNR, over
architectures (each one's mean index and mean PSNR over its images) and over
(architecture, image) points, on the random architectures and on the zoo's 35 models at
the same images and settings.

Usage: python -m studies.heldout_table HELDOUT.json ZOO.json [--images 0-4] > table.md
"""
import sys

from leakage import tables
from leakage.record import report_names
from studies.common import Parser, image_names, printed, read_rows


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.heldout_table")
    p.add_argument("heldout")
    p.add_argument("zoo")
    p.add_argument("--images", help="CIFAR-10 test indices to keep from both, e.g. 0-4")
    a = p.parse_args(argv)

    def make() -> str:
        names = image_names(a.images)
        return tables.side_by_side(read_rows(a.heldout, names), read_rows(a.zoo, names), report_names())
    return printed(p.prog, make)


if __name__ == "__main__":
    sys.exit(main())
