"""The settings, each declared once as a dataclass field and its flag (flags.setting)."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from leakage import flags
from leakage.attacks import ATTACKS, paper_attacks
from leakage.data import DEFAULT_SOURCE, PHOTOGRAPH_CLASSES, PHOTOGRAPH_SHAPE, SOURCES
from leakage.defences import DEFENCES
from leakage.models import init_value
from leakage.paper import CORRECTION_RULES
from leakage.runtime import PUBLISHED_SEED

# The settings, each declared once as a field and its flag (flags.setting): its default, its
# --help and how it is read. `meta` says what check_combinations reads: attacks_only (no effect
# with --analyse), needs (no effect without that setting) and not_with (none with that one).
# Which attacks a method setting needs is ATTACKS' rows' `settings`. The functions named in
# types and checks are defined with the command line, at the end of the file.
ATTACKING = {"attacks_only": True}


@dataclass(frozen=True)
class AttackSettings:
    """The method's settings: all that the attacks read. The defaults are the published
    code's (the paper's experiments); --quick takes each iteration count's `quick`."""

    dlg_iters: int = flags.setting(300, "L-BFGS steps of DLG and iDLG (paper: {default}; --quick: {quick})",
                                    type=flags.at_least(0, "--dlg-iters"), metavar="N", meta=ATTACKING | {"quick": 5})
    cosine_iters: int = flags.setting(4800, "Adam steps of Cosine+TV (paper: {default}; --quick: {quick})",
                                       type=flags.at_least(0, "--cosine-iters"), metavar="N",
                                       meta=ATTACKING | {"quick": 100})
    hybrid_iters: int = flags.setting(  # N, the schedule's base
        2000, "hybrid: N, with 4N Adam steps at layer 1 and N // 2 above (paper: {default}; --quick: {quick})",
        type=flags.at_least(0, "--hybrid-iters"), metavar="N", meta=ATTACKING | {"quick": 20})
    hybrid_iters_first: int = flags.setting(  # N0
        10000, "hybrid: N0, its Adam steps at layer 0, the image (paper: {default}; --quick: {quick})",
        type=flags.at_least(0, "--hybrid-iters-first"), metavar="N", meta=ATTACKING | {"quick": 100})
    restarts: int = flags.setting(1, "DLG, iDLG, Cosine+TV: R starts from random images, keeping the one with the "
                                      "lowest final objective of its own (default {default}: the paper's single run)",
                                   type=flags.at_least(1, "--restarts"), metavar="R", meta=ATTACKING)
    true_label: bool = flags.setting(False, "hand the true label to every attack (ablation)", action="store_true",
                                      meta=ATTACKING)
    compile: bool = flags.setting(False, "hybrid: torch.compile its objective and gradient (the same numbers; steps "
                                          "about 40%% faster, compiling up to 20 s per layer on a CPU the first time)",
                                   action="store_true", meta=ATTACKING)
    batch_images: int = flags.setting(
        4, "hybrid, hybrid_free: gradient-match up to B images of one model at once, the sum of their objectives "
           "(each image's numbers those of its run alone, to the bit with --threads 1; default {default}; "
           "1: one at a time)",
        type=flags.at_least(1, "--batch-images"), metavar="B", meta=ATTACKING)
    correct_where: str = flags.setting(
        "free-at-or-above", "hybrid_free: correct layer l where it or a layer above is rank-deficient "
        "(free-at-or-above, the default), or where layer l itself is (free-here)",
        choices=lambda: list(CORRECTION_RULES), meta=ATTACKING)
    verbose: bool = flags.setting(False, "per-layer details", "-v", "--verbose", action="store_true")
    # What the attacker knows of the client's defence, set by the experiment, not a flag:
    # under pruning, the shared gradient's exact zeros are missing entries (known_entries).
    zeros_are_missing: bool = False


@dataclass(frozen=True)
class Experiment:
    """What is attacked, and the model the client holds. With AttackSettings and
    sweeps.RunSettings, results.json records it as its `config`."""

    models: list[str] = flags.setting(
        ["cnn4_c2"], "target models (default {default}): a zoo name (--list-models), 'all' or a shell pattern such "
        "as 'cnn3_*'; an architecture string such as '12k5s2p2-sigmoid,fc-id'; random:N, N drawn architectures; "
        "your nn.Module, PATH.py:NAME or package.module:NAME, with literal arguments as Python writes them "
        "('torchvision.models:resnet18(num_classes=10)')", "--model", action="extend", nargs="+", metavar="NAME")
    image_indices: list[int] = flags.setting(
        [3], "images of --source (default {default}), or positions in the bundled photographs with --source "
        "samples; ranges such as 0-99 or 0-9,20,31", "--index", action="extend", nargs="+", metavar="I",
        meta={"not_with": "image_files"})
    batch: int = flags.setting(
        1, "each client trains on B images, the images of --index B at a time, and shares the gradient of their "
        "mean cross-entropy (default {default}); DLG, iDLG and Cosine+TV reconstruct the B images, paired with them "
        "for scoring by an optimal assignment", type=flags.at_least(1, "--batch"), metavar="B")
    source: str = flags.setting(
        DEFAULT_SOURCE, "a training set: cifar10 (the default), cifar100, mnist or fashion-mnist (where it is out of "
        "reach, its test set's first 20 images, which foolbox ships); a test set: cifar10-test, cifar100-test, "
        "mnist-test or fashion-mnist-test; samples: scikit-image's sample photographs",
        choices=lambda: SOURCES, meta={"not_with": "image_files"})
    image_files: list[str] = flags.setting([], "attack these image files (or the image files in these folders) "
                                            "instead", "--image", action="extend", nargs="+", metavar="PATH",
                                            type=flags.path_value)
    label: int | None = flags.setting(
        0, "the class of the --image files (0 to --classes - 1; default {default}); with --gradient the true label, "
        "where it is known (none by default)", type=flags.at_least(0, "--label"), metavar="K",
        meta={"needs": ("image_files", "gradient")})
    # The input and the classes come from the data; these two set them where nothing does.
    input_shape: list[int] | None = flags.setting(
        None, lambda: "the models' input where no data gives it: the --image files are made C channels (1 or 3), "
        f"HxW (default {' '.join(map(str, PHOTOGRAPH_SHAPE))}, as published); with --gradient, the input it was "
        "computed on (default: --source's)", nargs=3, metavar=("C", "H", "W"),
        type=flags.at_least(1, "--input-shape"), meta={"needs": ("image_files", "gradient")})
    classes: int | None = flags.setting(
        None, lambda: f"the models' classes where no data gives them (--image files: default {PHOTOGRAPH_CLASSES}; "
        "--gradient: --source's)", type=flags.at_least(2, "--classes"), metavar="K",
        meta={"needs": ("image_files", "gradient")})
    normalize: list[float] | None = flags.setting(
        None, "torchvision's Normalize on [0, 1] pixels, the models' input: MEAN STD for every channel, or C means "
        "then C stds (default 0.5 1: the published code's pixels - 0.5)", nargs="+", type=float, metavar="V")
    attacks: list[str] = flags.setting(
        lambda: paper_attacks(), lambda: f"from {' '.join(ATTACKS)} (default: the paper's "
        f"{' '.join(paper_attacks())}; hybrid_free is ours: the hybrid, correcting only layers the systems leave "
        "free)", action="extend", nargs="+", choices=lambda: list(ATTACKS), metavar="NAME", meta=ATTACKING)
    defences: list[str] = flags.setting(
        ["none"], lambda: "what the client does to its gradient before sharing it: " + "; ".join(
            kind.usage(name) + f" ({kind.what})" for name, kind in DEFENCES.items()) + "; several make a grid",
        "--defence", action="extend", nargs="+", metavar="DEFENCE")
    seed: int = flags.setting(PUBLISHED_SEED, "seed set before every attack (default {default})",
                               type=lambda text: seed_value(text), metavar="S", meta=ATTACKING)
    model_seed: int = flags.setting(PUBLISHED_SEED, "seed set before a model's layers are built (default: the "
                                     "published code's {default})", type=lambda text: seed_value(text), metavar="S")
    weights: str | None = flags.setting(None, "load the model's weights from this state_dict (torch.save(model."
                                         "state_dict(), FILE)) instead of its initialisation", metavar="FILE.pt",
                                         type=flags.path_value)
    # Not a flag: --weights' file by its content (content_name), which the record compares, not its path.
    weights_name: str | None = None
    module_mode: str | None = flags.setting(
        None, "a module model's mode when the client computes its gradient, and the attacker's: train (BatchNorm "
        "normalises by the batch's own statistics; dropout draws masks the attacker does not know) or eval (the "
        "running statistics; no dropout); default: the mode NAME builds it in (nn.Module's default is train)",
        choices=["train", "eval"])
    init: str | None = flags.setting(None, "uniform:A: draw every parameter uniform(-A, A) after --model-seed, as "
                                      "the DLG papers initialise their LeNet", metavar="uniform:A",
                                      type=lambda text: init_value(text), meta={"not_with": "weights"})
    gradient: str | None = flags.setting(
        None, "attack this gradient, captured elsewhere, instead of computing one: torch.save of a list of tensors "
        "in model.parameters() order, or of {{name: p.grad for name, p in model.named_parameters()}}; for one --model "
        "(with its --weights). --image FILE or --index I names the true image, to score against; alone, nothing is "
        "scored", metavar="FILE.pt", type=flags.path_value)
    train_steps: int = flags.setting(0, "train the model first: K SGD steps on mini-batches of 32 images that never "
                                      "include the attacked one (default {default}: the published initialisation)",
                                      type=flags.at_least(0, "--train-steps"), metavar="K",
                                      meta={"not_with": "gradient"})  # a captured gradient is of the weights given
    train_lr: float = flags.setting(0.01, "that SGD's learning rate (default {default})",
                                     type=lambda text: learning_rate(text), metavar="LR",
                                     meta={"needs": "train_steps"})
    device: str = flags.setting("auto", "auto (the default): CUDA where available", choices=["auto", "cpu", "cuda"])
    data: str = flags.setting("data", "where CIFAR-10 is, or is downloaded to (default {default})", metavar="DIR",
                               type=flags.path_value)


def seed_value(text: str) -> int:
    value = flags.at_least(0, "a seed")(text)
    if value >= 2**32:  # what numpy.random.seed accepts
        raise argparse.ArgumentTypeError(f"a seed must be in 0..2^32-1, not {value}")
    return value


def learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"--train-lr must be a positive number, not {text}")
    return value


def quick_iterations() -> dict[str, int]:
    """--quick's iteration counts, a smoke test's, as AttackSettings declares them."""
    return {f.name: f.metadata["quick"] for f in flags.flags_of(AttackSettings) if "quick" in f.metadata}
