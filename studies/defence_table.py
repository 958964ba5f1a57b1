"""Tabulates a defence study (studies/make_defences.sh): per model and attack, the mean PSNR
over the images under each defence; per defence kind, the weakest strength in the grid
from which on an attack's mean PSNR stays below 15 dB; and, under pruning, the security
index of the equations that survive against the PSNR that R-GAP and the hybrid reach.

Usage: python -m studies.defence_table STUDY.json [STUDY.json ...] [--figure PNG] > table.md
(several results.json, e.g. the linear attacks' and the baselines', are read as one study;
--figure draws the PSNR against each defence's strength, a panel per model and kind)
"""
import sys

from leakage import tables
from leakage.record import removing_equations, report_names
from studies.common import Parser, printed, read_rows


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.defence_table")
    p.add_argument("studies", nargs="+")
    p.add_argument("--figure", help="also draw the study's figure here")
    a = p.parse_args(argv)

    def make() -> str:
        rows = [r for path in a.studies for r in read_rows(path)]
        text = tables.defence_table(rows, report_names(), removing_equations())
        if a.figure:
            tables.plot_defence_table(rows, a.figure, report_names())
        return text
    return printed(p.prog, make)


if __name__ == "__main__":
    sys.exit(main())
