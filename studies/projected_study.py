"""The CIFAR-10 random study's wall time projected from each model's cost on a few images: the
seconds of every attack of each (model, image) in a run of one image per model, or of a few
(attacked together, as --batch-images does), per image, times the study's images, over its
cores. Beside it, the same projection from the committed study's
own pairs of that image, and the committed study's seconds over all its pairs (over the
cores): the projection's bias can be read off the two. Last, whether hybrid_free's answers that
equal the hybrid's or R-GAP's to the bit in the study still do in the run (issue #33).

Usage: python -m studies.projected_study RUN.json [--study assets/study_cifar_random.json]
       [--images 20] [--cores 2] [--top 8]
"""
import sys
from collections import Counter

from studies.common import Parser, Refused, printed, read_results


def seconds_per_model(results: dict, images: set[str] | None = None) -> Counter:
    """Each model's attack seconds, summed over its pairs (of `images` alone where given)."""
    out = Counter()
    for entry in results["runs"]:
        if images is None or entry["image"] in images:
            out[entry["model"]] += sum(a["seconds"] for a in entry.get("attacks", {}).values())
    return out


def equal(results: dict, attack: str) -> set[tuple[str, str]]:
    """The (model, image)s where hybrid_free's PSNR equals `attack`'s to the bit."""
    return {(e["model"], e["image"]) for e in results["runs"] if "hybrid_free" in e.get("attacks", {})
            and e["attacks"]["hybrid_free"]["psnr"] == e["attacks"].get(attack, {}).get("psnr")}


def identities(run: dict, study: dict, shown: set[str]) -> str:
    """Of the study's pairs (of the run's images) where hybrid_free equals the hybrid, or
    R-GAP, to the bit, how many still do in the run."""
    parts = []
    for attack, name in [("hybrid", "the hybrid's"), ("rgap", "R-GAP's")]:
        before = {pair for pair in equal(study, attack) if pair[1] in shown}
        parts.append(f"{name} on {len(before & equal(run, attack))} of the {len(before)} pairs where the study's was")
    return f"hybrid_free equal to the bit to {parts[0]}, and to {parts[1]}.\n"


def table(run_path: str, study_path: str, images: int, cores: int, top: int) -> str:
    run, study = read_results(run_path), read_results(study_path)
    shown = sorted({e["image"] for e in run["runs"]})
    image = shown[0] if len(shown) == 1 else f"{len(shown)} images"
    new, old = seconds_per_model(run), seconds_per_model(study, set(shown))
    if set(new) != set(old):
        raise Refused(f"{run_path}: its models are not the study's ({len(new)} against {len(old)})")
    hours = lambda seconds: seconds / len(shown) * images / cores / 3600  # noqa: E731
    lines = [f"| model | the study, {image} (s) | this run, {image} (s) | ratio |", "|---|---|---|---|"]
    for model in sorted(old, key=old.get, reverse=True)[:top]:
        lines.append(f"| {model} | {old[model]:.1f} | {new[model]:.1f} | {old[model] / new[model]:.2f}x |")
    others = sorted(old, key=old.get, reverse=True)[top:]
    if others:
        rest_old, rest_new = sum(old[m] for m in others), sum(new[m] for m in others)
        lines.append(f"| the other {len(others)} | {rest_old:.1f} | {rest_new:.1f} | {rest_old / rest_new:.2f}x |")
    total_old, total_new = sum(old.values()), sum(new.values())
    lines.append(f"| all {len(old)} | {total_old:.1f} | {total_new:.1f} | {total_old / total_new:.2f}x |")
    everything = sum(seconds_per_model(study).values()) / cores / 3600
    return ("\n".join(lines) + f"\n\nProjected on {cores} cores for {images} images: this run "
            f"{hours(total_new):.2f} h; "
            f"the study's code by the same projection {hours(total_old):.2f} h, and its seconds over all its pairs "
            f"{everything:.2f} h.\n\n" + identities(run, study, set(shown)))


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.projected_study")
    p.add_argument("run", help="results.json of a run of one image, or a few, per model")
    p.add_argument("--study", default="assets/study_cifar_random.json")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--top", type=int, default=8)
    a = p.parse_args(argv)
    return printed(p.prog, lambda: table(a.run, a.study, a.images, a.cores, a.top))


if __name__ == "__main__":
    sys.exit(main())
