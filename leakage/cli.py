"""The command line: the parser from the settings' declarations, the checks that need more than one
flag, and main."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shutil
import signal
import sys
import threading
from typing import NamedTuple

import torch

from leakage import flags, sweeps
from leakage.attacks import ATTACKS, paper_attacks, takes
from leakage.console import UserError, printable, say, warn
from leakage.data import (
    DEFAULT_SOURCE, PUBLISHED_NORMALIZE, PrivateImage, batched, data_format, load_images, normalize_of, normalized,
    parse_image_indices
)
from leakage.defences import canonical_defences
from leakage.experiment import analyse_images, prepare_model
from leakage.gradients import captured_gradient, fingerprint, load_gradient, pixel_space_hint
from leakage.models import MODELS, weights_content
from leakage.modules import blocking_text, build_model, expand_models, is_code_model, model_blocking
from leakage.record import RECORD, finish, paper_sweep
from leakage.runtime import configure_process
from leakage.settings import AttackSettings, Experiment, quick_iterations

# -----------------------------------------------------------------------------
# Paths users edit (the command line overrides both)
OUTPUT_PATH = "output"  # each run writes a new folder under here
DATA_PATH = "data"  # CIFAR-10 lives (or is downloaded) here


# =============================================================================
# The command line: the parser from the settings' declarations, the checks that need more
# than one value, and main
# =============================================================================


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, in main's words (argparse prints usage too)
        raise UserError(message)


class Paths(NamedTuple):
    """hybrid.py's two paths: where runs write their folders, and where the data lives."""

    output: str = "output"
    data: str = "data"


DESCRIPTION = ("Training-data leakage from gradients: linear systems and gradient matching"
               " (Chen and Campbell, BMVC 2022).")


def build_parser(only_given: bool = False, paths: Paths = Paths()) -> Parser:
    """Every flag, from the settings' declarations (Experiment, AttackSettings,
    sweeps.RunSettings) and the modes below. No flag has a default here: the defaults are the
    dataclasses', so that a parser whose missing flags are left out (only_given) tells which
    flags a command gave."""
    p = Parser(prog="hybrid.py", description=DESCRIPTION, allow_abbrev=False,  # a typo is no other flag
               formatter_class=argparse.RawDescriptionHelpFormatter,
               argument_default=argparse.SUPPRESS if only_given else None)
    flags.add_settings(p.add_argument_group("what is attacked"), Experiment, {"data": paths.data})
    a = p.add_argument_group("the attacks (defaults: the paper's settings)")
    a.add_argument("--quick", action="store_true", help="smoke-test iteration counts; flags given still win")
    flags.add_settings(a, AttackSettings)
    o = p.add_argument_group("what to do instead of attacking")
    o.add_argument("--analyse", action="store_true", help="print rank deficiencies and the security index")
    o.add_argument("--list-models", action="store_true", help="list the models")
    sweeps.add_arguments(p, paths.output)
    return p


def parse_args(argv: list[str], paths: Paths = Paths()) -> tuple[argparse.Namespace, set[str]]:
    """The command line, and the settings it gave (for check_combinations)."""
    return build_parser(paths=paths).parse_args(argv), set(vars(build_parser(True, paths).parse_args(argv)))


# Modes and what they keep: any other flag given with one has no effect. --analyse keeps the
# settings that are not the attacks' (its ranks need no attack) and --threads.
MODES = {"merge": {"merge", "output", "partial"}, "list_models": {"list_models"}}
RUN_FLAGS = {"resume", "shard", "jobs", "output", "partial"}  # what --analyse, which writes no folder, ignores


def check_combinations(args: argparse.Namespace, given: set[str]) -> None:
    """A flag that would be ignored, or that contradicts another, is one line and exit 2:
    a setting given must be a setting used (results.json records them all). What each
    setting needs is its declaration's `meta`, and which attacks read it ATTACKS'."""
    fields = {f.name: f for cls in (Experiment, AttackSettings, sweeps.RunSettings) for f in flags.flags_of(cls)}
    flag = lambda dest: flags.flag_name(fields[dest]) if dest in fields else "--" + dest.replace("_", "-")  # noqa: E731
    attacking = {dest for dest, f in fields.items() if f.metadata.get("attacks_only")} | {"quick"}
    ignored = []
    for mode, keeps in [*MODES.items(), ("analyse", given - attacking - RUN_FLAGS)]:
        if mode in given:
            ignored += [(d, f"with {flag(mode)}") for d in sorted(given - keeps)]
            break
    if "resume" in given and "merge" in given:
        ignored.append(("resume", "with --merge"))
    ignored += [(d, f"with {flag(f.metadata['not_with'])}") for d, f in fields.items()
                if d in given and f.metadata.get("not_with") in given]
    needs = {d: f.metadata["needs"] for d, f in fields.items() if "needs" in f.metadata} | {"partial": "merge"}
    needs = {d: (need,) if isinstance(need, str) else need for d, need in needs.items()}  # one of them
    ignored += [(d, f"without {' or '.join(map(flag, need))}") for d, need in needs.items()
                if d in given and not any(getattr(args, n) for n in need)]
    attacks = set(args.attacks or paper_attacks())
    for dest in fields:
        reading = [name for name, attack in ATTACKS.items() if dest in attack.settings]  # the attacks that read it
        if dest in given and reading and not attacks & set(reading):
            *others, last = reading
            ignored.append((dest, f"without {', '.join(others) + ' or ' if others else ''}{last}"))
    if ignored:
        dest, why = ignored[0]
        raise UserError(f"{flag(dest)} has no effect {why}")


def resolve_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible here (see CUDA_VISIBLE_DEVICES)")
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def check_compiler(device: str) -> None:
    """torch.compile needs a C++ compiler for the CPU and Triton for CUDA: say so up front."""
    if device == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise UserError("--compile needs a C++ compiler on the CPU (none found); run without --compile")
    if device == "cuda" and importlib.util.find_spec("triton") is None:
        raise UserError("--compile needs Triton on CUDA (pip install triton); run without --compile")


def settings_from(args: argparse.Namespace, paths: Paths = Paths()) -> tuple[Experiment, AttackSettings,
                                                                              sweeps.RunSettings]:
    """The command line as the three kinds of setting: the flags given, the dataclasses'
    defaults for the rest (--quick's for the iteration counts), every value checked."""
    quick = {name: n for name, n in quick_iterations().items() if args.quick and getattr(args, name) is None}
    settings = flags.given(AttackSettings, args, **quick)
    default = Experiment()
    shape, classes = data_format(args)
    if (args.image_files or args.gradient) and args.label is not None and args.label >= classes:
        raise UserError(f"--label {args.label} is not a class of a model with {classes} (0-{classes - 1}; "
                        "--classes K for more)")
    if args.normalize is not None:
        normalize_of(args.normalize, shape[0])  # checked now
    indices = (parse_image_indices(args.image_indices, args.source or DEFAULT_SOURCE) if args.image_indices
               else None)
    captured = {}
    if args.gradient is not None:  # a captured gradient: its true image only where one is named, its label where given
        indices, captured = indices or [], {"label": args.label}
    exp = flags.given(Experiment, args, models=expand_models(args.models or default.models, shape),
                       input_shape=list(shape), classes=classes,
                       image_indices=default.image_indices if indices is None else indices,
                       attacks=[a for a in ATTACKS if a in (args.attacks or default.attacks)],
                       defences=canonical_defences(args.defences or default.defences),
                       device=resolve_device(args.device or default.device), data=args.data or paths.data,
                       weights_name=None if args.weights is None else weights_content(args.weights)[1], **captured)
    if exp.gradient is not None and len(exp.models) != 1:
        raise UserError(f"--gradient is one model's gradient: give one --model, not {len(exp.models)}")
    if exp.gradient is not None and settings.true_label and exp.label is None:
        raise UserError("--true-label with --gradient needs the true label: --label K, or the image by --index")
    if settings.compile:
        check_compiler(exp.device)
    check_modules(exp, explicit=args.attacks is not None, analysing=args.analyse)
    return exp, settings, sweeps.run_settings(args, paths.output)


def check_modules(exp: Experiment, explicit: bool, analysing: bool) -> None:
    """Each model built once, now, before any folder (its shape, its arguments, weights and mode);
    where the linear attacks cannot take one, each named attack that cannot is refused by
    name, one line each, and the others run; the default attacks leave them out in one line;
    naming only attacks that cannot run, or --analyse, is a UserError."""
    shape = tuple(exp.input_shape)
    code = [m for m in exp.models if is_code_model(m)]
    if exp.module_mode is not None and not code:
        raise UserError("--module-mode has no effect without a module model (--model PATH.py:NAME or "
                        "package.module:NAME)")
    private = exp.batch > 1 and any(d.startswith("dp:") for d in exp.defences)
    for model in exp.models:  # a zoo name's layers on this shape, and --weights, too (not cell by cell)
        built = build_model(model, exp.model_seed, shape, exp.classes, exp.weights, exp.weights_name, exp.module_mode)
        if private and model in code:
            check_private(model, built)
    if exp.batch > 1:
        if analysing:
            raise UserError(f"--analyse with --batch {exp.batch}: the ranks are of one image's gradient (R-GAP's "
                            "recursion); analyse the images one at a time")
        if exp.train_steps and exp.image_files:
            raise UserError(f"--train-steps with --batch {exp.batch} and --image files: training leaves out the "
                            "attacked images, which it finds among the data's and the bundled photographs, not files")
        if exp.gradient is not None and any(d.startswith("dp:") for d in exp.defences):
            raise UserError(f"dp with --gradient and --batch {exp.batch}: DP-SGD clips each image's gradient before "
                            "the mean, and a captured batch gradient holds only the mean")
    for model in exp.models:
        blocking = model_blocking(model, shape)
        shown = f"--model {printable(model, 100)}"
        if not blocking and exp.batch == 1:
            continue
        why = (blocking_text(list(blocking)) if blocking else
               f"with --batch {exp.batch} the gradient is a batch's, and its systems are one image's")
        if analysing:  # with --batch, refused above
            raise UserError(f"--analyse: {shown}: its ranks come from R-GAP's recursion, which needs a chain of "
                            f"invertible layers: {why}")
        refused = [a for a in exp.attacks if not takes(a, blocking, exp.batch)]
        left = [a for a in exp.attacks if takes(a, blocking, exp.batch)]
        if not refused:
            continue
        if not left:
            raise UserError(f"{shown}: {' and '.join(ATTACKS[a].shown for a in refused)} cannot take it (they invert "
                            f"it layer by layer): {why}; DLG, iDLG and Cosine+TV can (--attacks dlg idlg cosine)")
        if explicit:
            for a in refused:
                say(f"{a}: {shown}: {ATTACKS[a].shown} cannot take it: {why}")
        else:
            how = (f"its layers are no chain: {blocking[0][0]} and {len(blocking) - 1} more" if blocking
                   else f"--batch {exp.batch} is a batch's gradient")
            say(f"{shown}: {', '.join(ATTACKS[a].shown for a in refused)} left out (they invert it layer by layer, and "
                f"{how}); running {', '.join(ATTACKS[a].shown for a in left)}")


def check_private(model: str, built: torch.nn.Module) -> None:
    """dp on a batch needs per-sample gradients: a module Opacus cannot take (BatchNorm mixes the
    batch's images) is one line, naming what Opacus's validator names."""
    import warnings

    from opacus.validators import ModuleValidator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problems = ModuleValidator.validate(built, strict=False)
    if problems:
        raise UserError(f"--model {printable(model, 100)}: dp on a batch clips each image's gradient, and Opacus "
                        f"computes none through it: {printable(str(problems[0]), 200)} (DP-SGD models use GroupNorm)")


def captured_image(exp: Experiment, images: list[PrivateImage]) -> PrivateImage:
    """The one cell's image of a captured gradient (--gradient): the image named to score
    against, carrying the gradient, or none (x None). Its gradient is checked against the
    model now, before any folder."""
    if len(images) > 1:
        raise UserError(f"--gradient is one {'batch' if exp.batch > 1 else 'image'}'s gradient: name "
                        f"{f'its {exp.batch} images' if exp.batch > 1 else 'one image'} to score against, not "
                        f"{len(images) * exp.batch}")
    captured = load_gradient(exp.gradient, tuple(exp.input_shape), exp.batch)
    normalize = PUBLISHED_NORMALIZE if exp.normalize is None else normalize_of(exp.normalize, exp.input_shape[0])
    if not images:
        image = PrivateImage(captured.name, None, exp.label, normalize, captured)
    elif exp.image_files:  # a file has no label of its own: --label's, where given
        label = exp.label if images[0].size == 1 or exp.label is None else (exp.label,) * images[0].size
        image = images[0]._replace(label=label, captured=captured)
    elif exp.label is not None:
        raise UserError(f"--label has no effect with --index: {images[0].name}'s label is the data's")
    else:
        image = images[0]._replace(captured=captured)
    model = prepare_model(exp, exp.models[0], image)[0]
    grads = captured_gradient(model, captured)
    for why in (fingerprint(model, grads, exp.batch), pixel_space_hint(model, image, grads)):
        if why is not None:
            as_what = ("one image's gradient (--batch B for a batch's)" if exp.batch == 1
                       else f"a batch of {exp.batch}'s")
            warn(f"{captured.where}: {why}; attacked as given, as {as_what}")
    return image


def list_models() -> int:
    for name, text in MODELS.items():
        say(f"{name:9s} {text}")
    return 0


def main(argv: list[str] | None = None, paths: Paths = Paths()) -> int:
    """`python hybrid.py ARGS`: 0, or 2 with one line for bad input (sweeps.stopped says how a run stopped)."""
    argv = sys.argv[1:] if argv is None else argv
    if hasattr(sys.stdout, "reconfigure"):  # a path that is not UTF-8 prints escaped, not as a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    if threading.current_thread() is threading.main_thread():  # a scheduler's time limit stops the run cleanly
        signal.signal(signal.SIGTERM, sweeps.on_sigterm)
    try:
        args, given = parse_args(argv, paths)
        check_combinations(args, given)
        if args.list_models:
            return list_models()
        if args.merge:
            sweeps.merge(args.merge, RECORD, args.output or paths.output, finish, args.partial)
            return 0
        exp, settings, run = settings_from(args, paths)
        configure_process(exp.device, run.threads, settings.verbose)
        # after the settings, so that an unknown model fails before any download
        images, used = [], exp.source  # a captured gradient named with no image has none
        if exp.image_files or exp.image_indices:
            images, used = load_images(exp, analysing=args.analyse)
        if exp.normalize is not None:
            images = [normalized(image, *normalize_of(exp.normalize, exp.input_shape[0])) for image in images]
        images = batched(images, exp.batch)  # a client's batch is one cell
        if not exp.image_files:  # the record names the source the images came from: a fallback is another experiment
            exp = dataclasses.replace(exp, source=used)
        if exp.gradient is not None:
            images = [captured_image(exp, images)]
        if args.analyse:
            return analyse_images(exp, images)
        sweeps.run(paper_sweep(exp, settings, run, argv, images), run)
    except (UserError, sweeps.CellsFailed, KeyboardInterrupt, sweeps.Terminated, OSError) as e:
        return sweeps.stopped(e, "hybrid.py")
    return 0
