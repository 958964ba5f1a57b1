"""The benchmark's two sides (studies/benchmark.sh) in a few lines: each side's wall time and
pairs per hour, their ratio, and how alike their numbers are: the largest per-pair PSNR
difference over every attack, the pairs whose three PSNRs are equal to the bit, and each
PSNR's difference by model, attack and image.

With --floor, the old side's run made again where its floating point differs (another CPU, or
this one with other kernels: ATEN_CPU_CAPABILITY=avx2 and the like), each of its differences
from the old side beside the new side's. That is the old code's own reproducibility: a pair it
cannot hold within 0.01 dB of itself is chaotic, and no change that moves a rounding holds it.

--names calls the two sides otherwise (batch-1 and batch-5, for one commit's two settings).

Usage: python -m studies.benchmark_table OLD.json OLD_SECONDS NEW.json NEW_SECONDS [--floor OLD_ELSEWHERE.json]
           [--names OLD NEW]
"""
import math
import sys

from leakage.record import rows_in
from studies.common import Parser, Refused, printed, read_results

TOLERANCE = 0.01  # dB: issue #33's "every pair's PSNR within 0.01 dB of the old code's"


def psnrs(path: str) -> dict[tuple[str, str, str], float]:
    """(model, image, attack) -> PSNR, in the record's order."""
    return {(r["model"], r["image"], r["attack"]): r["psnr"] for r in rows_in(read_results(path))}


def difference(old: float, new: float) -> float:
    """new - old; 0 where equal to the bit (inf - inf is exact on both sides, not nan)."""
    return 0.0 if old == new else new - old


def shown(d: float) -> str:
    return "0" if d == 0 else f"{d:+.4f}"


def speed(a, pairs: int) -> str:
    rate = lambda seconds: pairs / seconds * 3600  # noqa: E731
    old, new = a.names
    return (f"| side | wall | pairs per hour |\n|---|---|---|\n"
            f"| {old} | {a.old_seconds / 60:.1f} min | {rate(a.old_seconds):.0f} |\n"
            f"| {new} | {a.new_seconds / 60:.1f} min | {rate(a.new_seconds):.0f} |\n")


def by_model_and_attack(old: dict) -> dict[tuple[str, str], list[tuple[str, str, str]]]:
    """old's (model, image, attack)s grouped by (model, attack), images in the record's order."""
    groups: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for key in old:
        groups.setdefault((key[0], key[2]), []).append(key)
    return groups


def by_model(old: dict, sides: list[dict], headers: list[str]) -> str:
    """One row per (model, attack): each side's differences from old, image by image."""
    lines = [f"| model | attack | {' | '.join(headers)} |", "|---|---|" + "---|" * len(headers)]
    for (model, attack), keys in by_model_and_attack(old).items():
        columns = [", ".join(shown(difference(old[k], side[k])) for k in keys) for side in sides]
        lines.append(f"| {model} | {attack} | {' | '.join(columns)} |")
    return "\n".join(lines) + "\n"


def beyond(old: dict, new: dict, floor: dict | None, names: list[str]) -> str:
    """How many PSNRs move by more than the tolerance. With a floor, also how many of those the
    old side holds within it of itself move, PSNR by PSNR and (model, attack) by (model,
    attack): one run elsewhere is one draw of each chaotic trajectory, which may land near the
    old one by chance, so a (model, attack) counts as held only where every image is."""
    first, second = names
    moved = lambda side, keys: any(abs(difference(old[k], side[k])) > TOLERANCE for k in keys)  # noqa: E731
    largest = lambda keys: max((abs(difference(old[k], new[k])) for k in keys), default=0.0)  # noqa: E731
    text = f"PSNRs beyond {TOLERANCE} dB of the {first} side's: {second} {sum(moved(new, [k]) for k in old)} "
    text += f"of {len(old)}"
    if floor is None:
        return text + ".\n"
    held = [k for k in old if not moved(floor, [k])]
    held_groups = [keys for keys in by_model_and_attack(old).values() if not moved(floor, keys)]
    return (text + f"; the {first} side elsewhere {sum(moved(floor, [k]) for k in old)}. Of the {len(held)} PSNRs "
            f"the {first} side holds within {TOLERANCE} dB of itself, {second} moves "
            f"{sum(moved(new, [k]) for k in held)} beyond it (largest {largest(held):.4f} dB). Of the "
            f"{len(held_groups)} (model, attack)s it holds so on every image, {second} moves "
            f"{sum(moved(new, keys) for keys in held_groups)} (largest "
            f"{largest([k for keys in held_groups for k in keys]):.4f} dB).\n")


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.benchmark_table")
    p.add_argument("old")
    p.add_argument("old_seconds", type=float)
    p.add_argument("new")
    p.add_argument("new_seconds", type=float)
    p.add_argument("--floor", help="the old side's run made again where its floating point differs")
    p.add_argument("--names", nargs=2, default=["old", "new"], metavar=("OLD", "NEW"), help="the sides' names")
    a = p.parse_args(argv)
    first, second = a.names

    def make() -> str:
        old, new = psnrs(a.old), psnrs(a.new)
        floor = psnrs(a.floor) if a.floor else None
        for path, side in [(a.new, new), (a.floor, floor)]:
            if side is not None and set(side) != set(old):
                raise Refused(f"{path}: did not attack the {first} side's (model, image, attack)s")
        pairs = {(m, i) for m, i, _ in old}
        worst = max(abs(difference(old[k], new[k])) for k in old)
        same = sum(all(old[k] == new[k] for k in old if k[:2] == pair) for pair in pairs)
        sides, headers = [new], [f"{second} - {first} (dB), image by image"]
        if floor is not None:
            sides, headers = sides + [floor], headers + [f"{first} elsewhere - {first} (dB)"]
        return (speed(a, len(pairs)) + "\n"
                f"{len(pairs)} pairs; {second} against {first}: {a.old_seconds / a.new_seconds:.2f}x the pairs per "
                f"hour. Largest per-pair PSNR difference {'nan' if math.isnan(worst) else f'{worst:.4f}'} dB; "
                f"{same} of {len(pairs)} pairs equal to the bit in all three attacks.\n\n"
                + by_model(old, sides, headers) + "\n" + beyond(old, new, floor, a.names))
    return printed(p.prog, make)


if __name__ == "__main__":
    sys.exit(main())
