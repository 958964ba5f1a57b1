"""The benchmark's two sides (studies/benchmark.sh) in a few lines: each side's wall time and
pairs per hour, their ratio, and how alike their numbers are: the largest per-pair PSNR
difference over every attack, and the pairs whose three PSNRs are equal to the bit.

Usage: python -m studies.benchmark_table OLD.json OLD_SECONDS NEW.json NEW_SECONDS
"""
import math
import sys

import hybrid as H
from studies.common import Parser, printed, read_results


def psnrs(path: str) -> dict[tuple[str, str, str], float]:
    return {(r["model"], r["image"], r["attack"]): r["psnr"] for r in H.rows_in(read_results(path))}


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.benchmark_table")
    p.add_argument("old")
    p.add_argument("old_seconds", type=float)
    p.add_argument("new")
    p.add_argument("new_seconds", type=float)
    a = p.parse_args(argv)

    def make() -> str:
        old, new = psnrs(a.old), psnrs(a.new)
        pairs = {(m, i) for m, i, _ in old}
        if set(old) != set(new):
            raise H.UserError("the two sides did not attack the same (model, image, attack)s")
        rate = lambda seconds: len(pairs) / seconds * 3600  # noqa: E731
        diffs = [0.0 if old[k] == new[k] else abs(old[k] - new[k]) for k in old]  # inf == inf: exact on both
        same = sum(all(old[k] == new[k] for k in old if k[:2] == pair) for pair in pairs)
        worst = max(diffs)
        return (f"| side | wall | pairs per hour |\n|---|---|---|\n"
                f"| old | {a.old_seconds / 60:.1f} min | {rate(a.old_seconds):.0f} |\n"
                f"| new | {a.new_seconds / 60:.1f} min | {rate(a.new_seconds):.0f} |\n\n"
                f"{len(pairs)} pairs; new against old: {a.old_seconds / a.new_seconds:.2f}x the pairs per hour. "
                f"Largest per-pair PSNR difference {'nan' if math.isnan(worst) else f'{worst:.4f}'} dB; "
                f"{same} of {len(pairs)} pairs equal to the bit in all three attacks.\n")
    return printed(p.prog, make)


if __name__ == "__main__":
    sys.exit(main())
