"""Sets one zoo study beside another: by default a study on CIFAR-10
(studies/make_study_cifar.sh) beside the first study on the bundled photographs
(studies/make_study.sh); with --names, --images and --models, e.g. the trained CIFAR-10
study beside the random one on the same images, or the baselines beside the study. Each
index's rank correlations with PSNR in both, then each model's mean PSNR per attack in
both. Same models, same model seed: each model's indices are the same in both (checked;
the ranks are the architecture's).

Usage: python -m studies.study_table FIRST.json SECOND.json [--names CIFAR-10 photographs]
           [--images 0-9] [--models cnn2_c2 lenet ...] > table.md
"""
import sys

from leakage import tables
from leakage.record import report_names
from studies.common import Parser, image_names, printed, read_rows


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.study_table")
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--names", nargs=2, default=["CIFAR-10", "photographs"], help="the two studies' names")
    p.add_argument("--images", help="CIFAR-10 test indices to keep from both, e.g. 0-9")
    p.add_argument("--models", nargs="+", help="models to keep from both (default: all)")
    a = p.parse_args(argv)

    def make() -> str:
        images, labels = image_names(a.images), tuple(a.names)
        first, second = read_rows(a.first, images, a.models), read_rows(a.second, images, a.models)
        return (tables.side_by_side(first, second, report_names(), labels, ("models", "models"), "model")
                + "\n".join(tables.model_rows(first, second, labels, report_names())) + "\n")
    return printed(p.prog, make)


if __name__ == "__main__":
    sys.exit(main())
