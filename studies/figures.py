"""Draws a committed study's figures again from its results.json: each index against PSNR
and SSIM (report.plot_index_vs_quality), as a run folder's finish draws them, so that a
figure mended since its run is remade from the same numbers.

Usage: python -m studies.figures RESULTS.json INDEX.png [FRACTION.png]
"""
import sys

from leakage import report
from leakage.record import report_names, rows_in
from studies.common import Parser, printed, read_results


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.figures")
    p.add_argument("results")
    p.add_argument("index", help="where the security index's figure goes")
    p.add_argument("fraction", nargs="?", help="where the worst layer's fraction's figure goes (none: not drawn)")
    a = p.parse_args(argv)

    def make() -> str:
        results = read_results(a.results)
        rows = report.undefended(rows_in(results))
        names = report_names(results.get("config"))
        report.plot_index_vs_quality(rows, a.index, names, "security_index")
        if a.fraction:
            report.plot_index_vs_quality(rows, a.fraction, names, "worst_layer_fraction")
        return ""
    return printed(p.prog, make)


if __name__ == "__main__":
    sys.exit(main())
