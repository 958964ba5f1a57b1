"""What the scripts of studies/ share: a committed run's rows, read and checked, how a
script refuses an input (one line, exit 2, before any output), the CIFAR-10 study's budget,
and, for the timing scripts, CIFAR-10 test images in a one-thread process and a function of
hybrid.py replaced while they watch it."""
import argparse
import contextlib
import dataclasses
import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import hybrid as H
from leakage import sweeps
from leakage.console import UserError
from leakage.data import PrivateImage, load_test_split, parse_image_indices
from leakage.record import RECORD, rows_in
from leakage.runtime import configure_torch
from leakage.settings import AttackSettings


STUDY_SETTINGS = dataclasses.replace(AttackSettings(), hybrid_iters_first=2500, hybrid_iters=500)  # N0 2500, N 500


def one_thread_test_images(indices: list[int]) -> list[PrivateImage]:
    """CIFAR-10 test images (offline: the data folder, or foolbox's), this process set to
    one thread as hybrid.py runs (configure_torch)."""
    configure_torch("cpu", 1)
    return load_test_split("cifar10-test", indices, H.DATA_PATH, download=False)[0]


@contextlib.contextmanager
def patched(target: str, replacement: Callable) -> Iterator[None]:
    """MODULE.NAME (e.g. "leakage.paper.solve_layer", where the code looks it up) replaced
    within by replacement(the original, *args, **kwargs), and restored however it ends. A
    replacement never called is an error: the code no longer calls that name there, and a
    timing of it would silently time nothing."""
    module_name, _, name = target.rpartition(".")
    module = importlib.import_module(module_name)
    original, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        return replacement(original, *args, **kwargs)
    setattr(module, name, counted)
    try:
        yield
    finally:
        setattr(module, name, original)
    if not calls:
        raise RuntimeError(f"{target} was replaced but never called: the code no longer calls it there")


def per_model_table(prog: str, argv: list[str] | None, models: list[str], image: int, header: list[str],
                    rows: Callable[[str, PrivateImage], list[str]]) -> int:
    """A timing script's main: --models and --image (a CIFAR-10 test image, in a one-thread
    process), then the table: its header lines and rows(model, image) of each model."""
    p = Parser(prog=prog)
    p.add_argument("--models", nargs="+", default=models)
    p.add_argument("--image", type=int, default=image, help=f"the CIFAR-10 test image (default {image})")
    a = p.parse_args(argv)

    def make() -> str:
        (chosen,) = one_thread_test_images([a.image])
        return "\n".join(header + [line for name in a.models for line in rows(name, chosen)]) + "\n"
    return printed(p.prog, make)


class Parser(argparse.ArgumentParser):
    """argparse, refusing in one line (its usage is --help's)."""

    def error(self, message: str) -> None:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


class Refused(Exception):
    """An input a table script cannot tabulate: one line on stderr, exit status 2."""


def image_names(spec: str | None) -> set[str] | None:
    """The CIFAR-10 test images an --images spec such as 0-4 names; None (all) without one."""
    if spec is None:
        return None
    try:
        return {f"cifar10-test:{i}" for i in parse_image_indices([spec])}
    except UserError as e:
        raise Refused(str(e)) from None


def read_results(path: str, attack: str | None = None) -> dict:
    """A results.json that hybrid.py wrote (upgraded to this version's form), or Refused
    saying why not: missing, empty, truncated, another kind of file, no cells, or no
    `attack` where the table needs one."""
    try:
        results = sweeps.read_record(Path(path), RECORD)  # what a resume and a merge check, upgraded
    except FileNotFoundError:
        raise Refused(f"{path}: no such file") from None
    except IsADirectoryError:
        raise Refused(f"{path}: a folder, not a results.json (its results.json is inside)") from None
    except sweeps.NotARecord as e:
        raise Refused(f"{path}: {e}") from None
    except (ValueError, UnicodeDecodeError):
        raise Refused(f"{path}: not JSON (empty, or truncated?)") from None
    except OSError as e:
        raise Refused(f"{path}: {e.strerror or e}") from None
    if not any(e.get("attacks") for e in results["runs"]):
        raise Refused(f"{path}: holds no attack's results")
    if attack is not None and not any(attack in e.get("attacks", {}) for e in results["runs"]):
        raise Refused(f"{path}: holds no {attack} results, which this table reads")
    return results


def read_rows(path: str, images: set[str] | None = None, models: list[str] | None = None) -> list[dict]:
    """The rows of a run's results.json (report.py's), only `images` and `models` where given;
    Refused where none is left."""
    rows = [r for r in rows_in(read_results(path))
            if (images is None or r["image"] in images) and (models is None or r["model"] in models)]
    if not rows:
        raise Refused(f"{path}: no results left of the images and models asked for")
    return rows


def printed(name: str, make: Callable[[], str]) -> int:
    """Print what `make` returns and exit 0, or refuse in one line with exit 2: nothing is
    printed before every input has been read."""
    try:
        text = make()
    except (Refused, UserError) as e:  # hybrid.py's own refusals (an image index out of range) too
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":  # python -m studies.common FILE...: the make_*.sh scripts check their inputs first
    sys.exit(max(printed("python -m studies.common", lambda path=path: read_results(path) and "")
                 for path in sys.argv[1:]) if sys.argv[1:] else 0)
