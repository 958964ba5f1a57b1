"""Training-data leakage from gradients: linear systems and gradient matching.

Reference reproduction of

    Cangxiong Chen and Neill D. F. Campbell, "Analysing Training-Data Leakage from
    Gradients through Linear Systems and Gradient Matching", BMVC 2022
    (arXiv:2210.13231).

A client computes the cross-entropy gradient of one image (CIFAR-10's 3x32x32 in the
paper; CIFAR-100, MNIST and Fashion-MNIST too) on a small CNN and shares it. From the
architecture, the weights and that gradient alone, this script reconstructs the image
with the paper's hybrid attack (a least-squares solve of each layer's linear system,
corrected by gradient matching) and with the baselines R-GAP, DLG, iDLG and Cosine+TV;
it scores them with PSNR and SSIM and reports each layer's rank deficiency, the paper's
security index and our worst layer's fraction of free unknowns.

Examples:

    python hybrid.py --quick --source samples         # smoke test, under a minute on a CPU
    python hybrid.py                                   # paper settings: cnn4_c2, CIFAR-10 #3
    python hybrid.py --model cnn2_c1 cnn2_c2 cnn4_c1 cnn4_c2 --index 3 7   # the paper's grid
    python hybrid.py --analyse --model cnn3_c1 cnn4_c2 # rank deficiency + both indices only
    python hybrid.py --analyse --model 8k3s1p0-tanh,4k4s2p0-leaky,fc-id   # your own architecture
    python hybrid.py --model random:40 --index 0-4 --attacks rgap hybrid   # 40 random architectures
    python hybrid.py --attacks rgap hybrid hybrid_free # and ours: correct only where the ranks leave freedom
    python hybrid.py --image cat.png --label 3 --model cnn2_c1 --attacks rgap
    python hybrid.py --source mnist-test --index 0-3 --attacks rgap idlg   # MNIST's 1x28x28, 10 classes
    python hybrid.py --model lenet.py:LeNet --init uniform:0.5 --source mnist-test   # your nn.Module
    python hybrid.py --attacks dlg idlg --restarts 4   # the baselines, each the best of 4 starts
    python hybrid.py --model all --source samples --index 0-4 --attacks rgap hybrid --jobs auto
                                                       # does the security index predict leakage?
    python hybrid.py --model 'cnn3_*' --train-steps 500 --attacks rgap hybrid   # on trained weights
    python hybrid.py --model cnn4_c2 --index 0-99 --quick --shard 0/4   # a quarter of a sweep
    python hybrid.py --merge output/*_cnn4_c2*         # its shards, summarised

This file is the paper, in the order its data flows. Its sections:

    the two paths users edit; the settings (each declared once, with its flag)
    Data              CIFAR-10 (CIFAR-100, MNIST, Fashion-MNIST: DATASETS), scikit-image's
                      photographs, the user's files
    Models            the published zoo, architecture strings, random:N, your own
                      nn.Module (--model PATH.py:NAME, read with torch.fx)
    Weights           as published, or trained first (--train-steps)
    The client's gradient, and the label it gives away
    Linear systems    each layer's equations and R-GAP's recursion; the security index
    Attacks           the common signature; R-GAP; the hybrid (and hybrid_free, ours);
                      DLG, iDLG and Cosine+TV; ATTACKS, one row per attack
    Defences          DEFENCES, one row per kind: none, noise, prune, dp
    Metrics           PSNR and SSIM
    The experiment    one cell (model, image, defence); --analyse
    Sweeps            the record's rows and how an older record is read; what sweeps.py runs
    The command line  the parser from the declarations, the checks, and a short main

To add an attack: its function and one row of ATTACKS; a defence: its function and one
row of DEFENCES; a setting: one field declared with sweeps.setting. The machinery of long
runs (run folders, the record, resume, shards, worker processes, merge) is sweeps.py,
which knows nothing of the paper; what a run folder says (summaries, correlations,
figures, the study tables) is report.py. Where this departs from the published code, and
why: docs/departures.md.
"""
from __future__ import annotations

try:  # the libraries take seconds to load: a Ctrl-C meanwhile ends quietly, as it does later
    import argparse
    import contextlib
    import contextvars
    import dataclasses
    import fnmatch
    import functools
    import hashlib
    import importlib.util
    import io
    import logging
    import math
    import os
    import platform
    import re
    import shlex
    import shutil
    import signal
    import socket
    import stat
    import sys
    import threading
    import time
    from dataclasses import dataclass, field
    from pathlib import Path
    from typing import Callable, Iterator, NamedTuple

    import numpy as np
    import scipy.linalg
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from threadpoolctl import threadpool_limits

    import report
    import sweeps
    from sweeps import UserError, printable, progress, say, warn
except KeyboardInterrupt:
    raise SystemExit(130) from None
except ImportError as e:  # a Ctrl-C inside an extension's import (numpy's) reaches here as its ImportError
    cause = e
    while cause is not None and not isinstance(cause, KeyboardInterrupt):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        raise
    raise SystemExit(130) from None

# -----------------------------------------------------------------------------
# Paths users edit (the command line overrides both)
OUTPUT_PATH = "output"  # each run writes a new folder under here
DATA_PATH = "data"  # CIFAR-10 lives (or is downloaded) here
# -----------------------------------------------------------------------------

PUBLISHED_SEED = 10  # the published code set torch's and numpy's seeds to 10


# The settings, each declared once as a field and its flag (sweeps.setting): its default, its
# --help and how it is read. `meta` says what check_combinations reads: attacks_only (no effect
# with --analyse), needs (no effect without that setting) and not_with (none with that one).
# Which attacks a method setting needs is ATTACKS' rows' `settings`. The functions named in
# types and checks are defined with the command line, at the end of the file.
ATTACKING = {"attacks_only": True}


@dataclass(frozen=True)
class AttackSettings:
    """The method's settings: all that the attacks read. The defaults are the published
    code's (the paper's experiments); --quick takes each iteration count's `quick`."""

    dlg_iters: int = sweeps.setting(300, "L-BFGS steps of DLG and iDLG (paper: {default}; --quick: {quick})",
                                    type=sweeps.at_least(0, "--dlg-iters"), metavar="N", meta=ATTACKING | {"quick": 5})
    cosine_iters: int = sweeps.setting(4800, "Adam steps of Cosine+TV (paper: {default}; --quick: {quick})",
                                       type=sweeps.at_least(0, "--cosine-iters"), metavar="N",
                                       meta=ATTACKING | {"quick": 100})
    hybrid_iters: int = sweeps.setting(  # N, the schedule's base
        2000, "hybrid: N, with 4N Adam steps at layer 1 and N // 2 above (paper: {default}; --quick: {quick})",
        type=sweeps.at_least(0, "--hybrid-iters"), metavar="N", meta=ATTACKING | {"quick": 20})
    hybrid_iters_first: int = sweeps.setting(  # N0
        10000, "hybrid: N0, its Adam steps at layer 0, the image (paper: {default}; --quick: {quick})",
        type=sweeps.at_least(0, "--hybrid-iters-first"), metavar="N", meta=ATTACKING | {"quick": 100})
    restarts: int = sweeps.setting(1, "DLG, iDLG, Cosine+TV: R starts from random images, keeping the one with the "
                                      "lowest final objective of its own (default {default}: the paper's single run)",
                                   type=sweeps.at_least(1, "--restarts"), metavar="R", meta=ATTACKING)
    true_label: bool = sweeps.setting(False, "hand the true label to every attack (ablation)", action="store_true",
                                      meta=ATTACKING)
    compile: bool = sweeps.setting(False, "hybrid: torch.compile its objective and gradient (the same numbers; steps "
                                          "about 40%% faster, compiling up to 20 s per layer on a CPU the first time)",
                                   action="store_true", meta=ATTACKING)
    batch_images: int = sweeps.setting(
        4, "hybrid, hybrid_free: gradient-match up to B images of one model at once, the sum of their objectives "
           "(each image's numbers those of its run alone, to the bit with --threads 1; default {default}; "
           "1: one at a time)",
        type=sweeps.at_least(1, "--batch-images"), metavar="B", meta=ATTACKING)
    correct_where: str = sweeps.setting(
        "free-at-or-above", "hybrid_free: correct layer l where it or a layer above is rank-deficient "
        "(free-at-or-above, the default), or where layer l itself is (free-here)",
        choices=lambda: list(CORRECT_WHERE), meta=ATTACKING)
    verbose: bool = sweeps.setting(False, "per-layer details", "-v", "--verbose", action="store_true")
    # What the attacker knows of the client's defence, set by the experiment, not a flag:
    # under pruning, the shared gradient's exact zeros are missing entries (known_entries).
    zeros_are_missing: bool = False


@dataclass(frozen=True)
class Experiment:
    """What is attacked, and the model the client holds. With AttackSettings and
    sweeps.RunSettings, results.json records it as its `config`."""

    models: list[str] = sweeps.setting(["cnn4_c2"], "target models (default {default}; --list-models); 'all', or "
                                       "shell patterns such as 'cnn3_*'", "--model", action="extend", nargs="+",
                                       metavar="NAME")
    image_indices: list[int] = sweeps.setting(
        [3], "images of --source (default {default}), or positions in the bundled photographs with --source "
        "samples; ranges such as 0-99 or 0-9,20,31", "--index", action="extend", nargs="+", metavar="I",
        meta={"not_with": "image_files"})
    source: str = sweeps.setting(
        "cifar10", "a training set: cifar10 (the default), cifar100, mnist or fashion-mnist (where it is out of "
        "reach, its test set's first 20 images, which foolbox ships); a test set: cifar10-test, cifar100-test, "
        "mnist-test or fashion-mnist-test; samples: scikit-image's sample photographs",
        choices=lambda: SOURCES, meta={"not_with": "image_files"})
    image_files: list[str] = sweeps.setting([], "attack these image files (or the image files in these folders) "
                                            "instead", "--image", action="extend", nargs="+", metavar="PATH",
                                            type=sweeps.path_value)
    label: int | None = sweeps.setting(
        0, "the class of the --image files (0 to --classes - 1; default {default}); with --gradient the true label, "
        "where it is known (none by default)", type=sweeps.at_least(0, "--label"), metavar="K",
        meta={"needs": ("image_files", "gradient")})
    # The input and the classes come from the data; these two set them where nothing does.
    input_shape: list[int] | None = sweeps.setting(
        None, lambda: "the models' input where no data gives it: the --image files are made C channels (1 or 3), "
        f"HxW (default {' '.join(map(str, PHOTOGRAPH_SHAPE))}, as published); with --gradient, the input it was "
        "computed on (default: --source's)", nargs=3, metavar=("C", "H", "W"),
        type=sweeps.at_least(1, "--input-shape"), meta={"needs": ("image_files", "gradient")})
    classes: int | None = sweeps.setting(
        None, lambda: f"the models' classes where no data gives them (--image files: default {PHOTOGRAPH_CLASSES}; "
        "--gradient: --source's)", type=sweeps.at_least(2, "--classes"), metavar="K",
        meta={"needs": ("image_files", "gradient")})
    normalize: list[float] | None = sweeps.setting(
        None, "torchvision's Normalize on [0, 1] pixels, the models' input: MEAN STD for every channel, or C means "
        "then C stds (default 0.5 1: the published code's pixels - 0.5)", nargs="+", type=float, metavar="V")
    attacks: list[str] = sweeps.setting(
        lambda: paper_attacks(), lambda: f"from {' '.join(ATTACKS)} (default: the paper's "
        f"{' '.join(paper_attacks())}; hybrid_free is ours: the hybrid, correcting only layers the systems leave "
        "free)", action="extend", nargs="+", choices=lambda: list(ATTACKS), metavar="NAME", meta=ATTACKING)
    defences: list[str] = sweeps.setting(
        ["none"], lambda: "what the client does to its gradient before sharing it: " + "; ".join(
            kind.usage(name) + f" ({kind.what})" for name, kind in DEFENCES.items()) + "; several make a grid",
        "--defence", action="extend", nargs="+", metavar="DEFENCE")
    seed: int = sweeps.setting(PUBLISHED_SEED, "seed set before every attack (default {default})",
                               type=lambda text: seed_value(text), metavar="S", meta=ATTACKING)
    model_seed: int = sweeps.setting(PUBLISHED_SEED, "seed set before a model's layers are built (default: the "
                                     "published code's {default})", type=lambda text: seed_value(text), metavar="S")
    weights: str | None = sweeps.setting(None, "load the model's weights from this state_dict (torch.save(model."
                                         "state_dict(), FILE)) instead of its initialisation", metavar="FILE.pt",
                                         type=sweeps.path_value)
    # Not a flag: --weights' file by its content (content_name), which the record compares, not its path.
    weights_name: str | None = None
    init: str | None = sweeps.setting(None, "uniform:A: draw every parameter uniform(-A, A) after --model-seed, as "
                                      "the DLG papers initialise their LeNet", metavar="uniform:A",
                                      type=lambda text: init_value(text), meta={"not_with": "weights"})
    gradient: str | None = sweeps.setting(
        None, "attack this gradient, captured elsewhere, instead of computing one: torch.save of a list of tensors "
        "in model.parameters() order, or of {{name: p.grad for name, p in model.named_parameters()}}; for one --model "
        "(with its --weights). --image FILE or --index I names the true image, to score against; alone, nothing is "
        "scored", metavar="FILE.pt", type=sweeps.path_value)
    train_steps: int = sweeps.setting(0, "train the model first: K SGD steps on mini-batches of 32 images that never "
                                      "include the attacked one (default {default}: the published initialisation)",
                                      type=sweeps.at_least(0, "--train-steps"), metavar="K",
                                      meta={"not_with": "gradient"})  # a captured gradient is of the weights given
    train_lr: float = sweeps.setting(0.01, "that SGD's learning rate (default {default})",
                                     type=lambda text: learning_rate(text), metavar="LR",
                                     meta={"needs": "train_steps"})
    device: str = sweeps.setting("auto", "auto (the default): CUDA where available", choices=["auto", "cpu", "cuda"])
    data: str = sweeps.setting(DATA_PATH, "where CIFAR-10 is, or is downloaded to (default {default})", metavar="DIR",
                               type=sweeps.path_value)


def seed_everything(seed: int) -> None:
    """The one seeding helper: models are built and every attack starts after it."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def configure_process(device: str, threads: int, verbose: bool) -> None:
    """Per process (the run's and each worker's): torch's threads and kernels, and with -v
    progress lines in logs."""
    configure_torch(device, threads)
    sweeps.progress_in_logs(verbose)


def configure_torch(device: str, threads: int) -> None:
    """Per process: `threads` threads for torch and the BLAS libraries, since batch-1 attack
    loops gain nothing from a second thread and processes side by side fight over cores
    (docs/performance.md); PyTorch's own CPU convolutions."""
    torch.set_num_threads(threads)
    threadpool_limits(threads)  # OpenBLAS of numpy and scipy (the pivoted QR of the solves)
    if device == "cpu":  # oneDNN's convolutions lose to PyTorch's own on the batch-1
        torch.backends.mkldnn.enabled = False  # double backward (docs/performance.md)


# =============================================================================
# Data: CIFAR-10 (CIFAR-100, MNIST, Fashion-MNIST), photographs bundled with
# scikit-image, or the user's files
# =============================================================================


PUBLISHED_NORMALIZE = ((0.5,), (1.0,))  # (mean, std): the published code's ToTensor() - 0.5


class PrivateImage(NamedTuple):
    """An image the client trains on, with its label: what the attacks try to recover. With
    --gradient, the gradient the client shared is `captured`, and the image is the target to
    score against where one is named (x and label None where none is, or no label given)."""

    name: str  # e.g. "cifar10:3", "mnist-test:7", "samples:chelsea", "file:cat.png@3fa2b1c0d9", "gradient:g.pt@1a2b"
    x: torch.Tensor | None  # (1, C, H, W): (1, 3, 32, 32) for CIFAR; (pixels - mean) / std, in [-0.5, 0.5] by default
    label: int | None
    normalize: tuple = PUBLISHED_NORMALIZE  # (mean, std), per channel or one for all
    captured: Captured | None = None  # --gradient: what the client shared, read from a file

    @property
    def shape(self) -> tuple[int, int, int]:
        """The models' input (C, H, W)."""
        return tuple(self.x.shape[1:]) if self.x is not None else self.captured.shape


def normalized(image: PrivateImage, mean: tuple, std: tuple) -> PrivateImage:
    """`image` as torchvision's Normalize(mean, std) gives it from [0, 1] pixels (--normalize)."""
    pixels = image.x + 0.5  # the published space's pixels
    m, s = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
    return image._replace(x=(pixels - m) / s, normalize=(tuple(mean), tuple(std)))


def to_model_space(rgb: np.ndarray) -> torch.Tensor:
    """HWC uint8 or [0, 1] float -> the model's input: CHW in [-0.5, 0.5].

    The published code fed ToTensor()'s [0, 1] pixels minus 0.5, with no mean/std
    normalisation; figures and metrics add the 0.5 back (to_image).
    """
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        rgb = rgb / 255.0
    return torch.as_tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None] - 0.5


def to_image(x: torch.Tensor, normalize: tuple = PUBLISHED_NORMALIZE) -> np.ndarray:
    """Model space -> HWC float in [0, 1] for metrics, figures and .npy files: x std + mean
    (by default x * 1 + 0.5, the published code's x + 0.5 to the bit)."""
    mean, std = (np.array(v, dtype=np.float64) for v in normalize)
    return (x.detach().double().cpu()[0].permute(1, 2, 0).numpy() * std + mean).clip(0, 1)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
    dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
    lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
    pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew
    skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
    tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())  # fine labels
FASHION_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")


class Dataset(NamedTuple):
    """One of the datasets the attacks read: through torchvision where it is under --data
    (or downloadable), its first FOOLBOX_IMAGES test images from foolbox's wheel offline."""

    shown: str  # as a message names it
    torchvision: str  # its class in torchvision.datasets
    foolbox: str  # foolbox's wheel holds its test image i, label L, as foolbox/data/{foolbox}_ii_L.png
    shape: tuple[int, int, int]  # (C, H, W): what the models built for it take
    classes: tuple[str, ...]
    sizes: tuple[int, int]  # images in the training set and in the test set


DATASETS: dict[str, Dataset] = {
    "cifar10": Dataset("CIFAR-10", "CIFAR10", "cifar10", (3, 32, 32), CIFAR10_CLASSES, (50_000, 10_000)),
    "cifar100": Dataset("CIFAR-100", "CIFAR100", "cifar100", (3, 32, 32), CIFAR100_CLASSES, (50_000, 10_000)),
    "mnist": Dataset("MNIST", "MNIST", "mnist", (1, 28, 28), tuple("0123456789"), (60_000, 10_000)),
    "fashion-mnist": Dataset("Fashion-MNIST", "FashionMNIST", "fashionMNIST", (1, 28, 28), FASHION_CLASSES,
                             (60_000, 10_000)),
}
SOURCES = [*(f"{name}{split}" for name in DATASETS for split in ("", "-test")), "samples"]
MAX_IMAGES = max(size for d in DATASETS.values() for size in d.sizes)  # no --index reaches beyond
FOOLBOX_IMAGES = 20  # foolbox's wheel ships each dataset's first 20 test images
PHOTOGRAPH_SHAPE, PHOTOGRAPH_CLASSES = (3, 32, 32), 10  # the photographs and --image files, as the published code


def dataset_of(source: str) -> tuple[str, bool]:
    """'mnist-test' -> ('mnist', False): the dataset and whether it is the training set."""
    name = source.removesuffix("-test")
    return name, name == source


class Unavailable(Exception):
    """A dataset that cannot be had, and why: not there and not downloadable, or there but
    damaged (`damaged`: torchvision's checksums fail), which no download here mends."""

    def __init__(self, reason: str, damaged: bool) -> None:
        super().__init__(reason)
        self.damaged = damaged


def torchvision_set(name: str, root: str, train: bool, download: bool = True):
    """A dataset's training or test set through torchvision, downloading it if needed (and
    `download`); Unavailable where it cannot be had."""
    import torchvision

    data, split = DATASETS[name], "training" if train else "test"
    kind = getattr(torchvision.datasets, data.torchvision)
    try:
        return kind(root=root, train=train, download=False)
    except (OSError, RuntimeError, ValueError):
        pass
    # where torchvision keeps it: CIFAR's base_folder; MNIST's ROOT/<class>/raw
    folder = Path(root) / (kind.base_folder if hasattr(kind, "base_folder") else Path(kind.__name__, "raw"))
    damaged = folder.is_dir() and any(folder.iterdir())
    if not download:
        raise Unavailable(f"{data.shown}'s {split} set is {'damaged' if damaged else 'not'} in {root}/", damaged)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # an offline machine must not hang on the download
    try:
        return kind(root=root, train=train, download=True)
    except (OSError, RuntimeError, ValueError) as e:  # no network, no disk, bad archive
        if damaged:
            raise Unavailable(f"{data.shown}'s {split} set in {folder}/ is damaged (its files fail torchvision's "
                              f"checksums); remove {folder}/ to download it again", damaged=True) from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise Unavailable(f"{data.shown}'s {split} set is not in {root}/ and could not be downloaded ({reason})",
                          damaged=False) from None
    finally:
        socket.setdefaulttimeout(old)


def as_pixels(image) -> np.ndarray:
    """A torchvision image (PIL, RGB or grayscale) as HWC uint8, a copy (PIL's buffer is
    read-only, and torch warns when a tensor wraps one)."""
    pixels = np.array(image)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def load_split(source: str, image_indices: list[int], root: str, download: bool = True) -> list[PrivateImage] | str:
    """Images of a training set through torchvision, downloading if needed (and
    `download`), or why they cannot be had."""
    name, _ = dataset_of(source)
    try:
        data = torchvision_set(name, root, train=True, download=download)
    except Unavailable as e:
        return str(e)
    out = []
    for i in image_indices:
        if not 0 <= i < len(data):
            raise UserError(f"--index {i} is out of range: {DATASETS[name].shown} has training images "
                            f"0-{len(data) - 1}")
        img, label = data[i]
        out.append(PrivateImage(f"{source}:{i}", to_model_space(as_pixels(img)), int(label)))
    return out


REINSTALL = "pip install --force-reinstall foolbox"


def foolbox_files(name: str = "cifar10") -> dict[int, tuple]:
    """Where foolbox's wheel keeps a dataset's first 20 test images, and their labels:
    image i -> (file, label), found by importlib.metadata, without importing foolbox; or a
    UserError saying what to install."""
    import importlib.metadata

    data = DATASETS[name]
    try:
        files = importlib.metadata.files("foolbox") or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"{data.shown}'s test set is neither on disk nor downloadable here, and foolbox, whose wheel "
                        "ships its first 20 images, is not installed: pip install foolbox") from None
    found = {}
    for f in files:
        match = re.fullmatch(rf"{data.foolbox}_(\d\d)_(\d+)\.png", f.name)
        if match and f.parent.name == "data":
            found[int(match[1])] = (f, int(match[2]))
    if sorted(found) != list(range(FOOLBOX_IMAGES)):
        raise UserError(f"foolbox's wheel should hold {data.shown} test images 0-{FOOLBOX_IMAGES - 1}; this one holds "
                        f"{len(found)} ({REINSTALL})")
    return found


def foolbox_image(i: int, name: str = "cifar10", files: dict | None = None) -> tuple[np.ndarray, int]:
    """A dataset's test image i (< FOOLBOX_IMAGES) from foolbox's wheel (`files`, its
    foolbox_files) as HWC uint8 with the data's channels, read alone: a damaged file costs
    its own image, and says how to mend it."""
    f, label = (files or foolbox_files(name))[i]
    try:
        # np.array, a copy: PIL's buffer is read-only, and torch warns when a tensor wraps one
        return fit_image(np.array(read_image(str(f.locate()))), DATASETS[name].shape), label
    except Exception as e:  # Pillow's errors, a file removed since
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"foolbox's copy of {DATASETS[name].shown} test image {i} ({f.name}) cannot be read: "
                        f"{printable(why, 200)} ({REINSTALL})") from None


def foolbox_test_set(name: str = "cifar10") -> list[tuple[np.ndarray, int]]:
    """A dataset's first 20 test images and labels, from foolbox's wheel."""
    files = foolbox_files(name)
    return [foolbox_image(i, name, files) for i in range(FOOLBOX_IMAGES)]


def load_test_split(source: str, image_indices: list[int], root: str,
                    download: bool = True) -> tuple[list[PrivateImage], str]:
    """Test images, named SOURCE:I (e.g. cifar10-test:3, never to be taken for training
    images): the whole test set through torchvision where it is on disk or downloadable,
    else its first 20 from foolbox's wheel. Returns them and where they came from."""
    name, _ = dataset_of(source)
    shown = DATASETS[name].shown
    try:
        data = torchvision_set(name, root, train=False, download=download)
        get, size, where = (lambda i: (as_pixels(data[i][0]), int(data[i][1]))), len(data), "torchvision"
    except Unavailable as e:  # foolbox's 20; a damaged copy is worth a word, an absent one not
        if e.damaged:
            warn(str(e))
        get, size, where = (lambda i: foolbox_image(i, name)), FOOLBOX_IMAGES, "foolbox"
    out = []
    for i in image_indices:
        if not 0 <= i < size:
            has = (f"{shown} has test images 0-{size - 1}" if where == "torchvision"
                   else f"only {shown}'s test images 0-{FOOLBOX_IMAGES - 1} ship without a download "
                        f"(in foolbox's wheel); the rest needs {shown} in --data or a network")
            raise UserError(f"--index {i} is out of range: {has}")
        pixels, label = get(i)
        out.append(PrivateImage(f"{name}-test:{i}", to_model_space(pixels), label))
    return out, where


# scikit-image's sample photographs (skimage.data), used where CIFAR-10 is not available
# (--source samples). (name, loader, label): the label is the nearest CIFAR-10 class where
# there is one (cat 3, airplane 0, automobile 1); any class is a valid training label otherwise.
PHOTOGRAPHS = [
    ("astronaut", lambda d: d.astronaut(), 4),
    ("coffee", lambda d: d.coffee(), 5),
    ("rocket", lambda d: d.rocket(), 0),
    ("chelsea", lambda d: d.chelsea(), 3),  # position 3, like CIFAR-10 index 3
    ("motorcycle", lambda d: d.stereo_motorcycle()[0], 1),
]


LUMINANCE = (0.299, 0.587, 0.114)  # RGB -> gray, as PIL's convert("L")


def fit_image(pixels: np.ndarray, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> np.ndarray:
    """HWC pixels as the model's input `shape` (C, H, W): centre-cropped to its aspect and
    resized with anti-aliasing where the size differs (an image of its size stays exact),
    made gray (PIL's luminance) for one channel."""
    from skimage.transform import resize

    c, h, w = shape
    if pixels.shape[:2] != (h, w):
        rows, cols = pixels.shape[:2]
        keep_rows, keep_cols = min(rows, cols * h // w), min(cols, rows * w // h)
        top, left = (rows - keep_rows) // 2, (cols - keep_cols) // 2
        pixels = resize(pixels[top : top + keep_rows, left : left + keep_cols], (h, w), anti_aliasing=True,
                        preserve_range=False)
    if c == 1 and pixels.shape[2] == 3:
        same = (pixels[..., :1] == pixels[..., 1:]).all()  # a grayscale file read as RGB: exact
        gray = pixels[..., :1] if same else pixels @ np.array(LUMINANCE)[:, None]
        pixels = gray if same or pixels.dtype != np.uint8 else gray / 255.0
    return pixels


def load_photographs(image_indices: list[int]) -> list[PrivateImage]:
    for i in image_indices:
        if not 0 <= i < len(PHOTOGRAPHS):
            raise UserError(f"--index {i} is out of range: the bundled photographs are 0-{len(PHOTOGRAPHS) - 1}")
    return [all_photographs()[i] for i in image_indices]


@functools.cache
def all_photographs() -> tuple[PrivateImage, ...]:
    """The bundled photographs at 32x32, read and resized once a process (training looks
    for the attacked image among them on every cell)."""
    import skimage.data

    return tuple(PrivateImage(f"samples:{name}", to_model_space(fit_image(load(skimage.data))), label)
                 for name, load, label in PHOTOGRAPHS)


LARGE = 1024  # a shorter side above this is first shrunk by Pillow (a box filter), to at least this


def read_image(file: str | io.BytesIO) -> np.ndarray:
    """An image file as HWC pixels at its own range: uint8 for 8-bit files (any mode that
    Pillow turns into RGB), floats in [0, 1] for 16-bit and floating-point grayscale,
    which Pillow's conversion to RGB would clip to white or black. Turned upright by its
    EXIF orientation (a phone's portrait); a large one shrunk first by an integer factor
    (skimage's anti-aliased resize of a 6000x6000 image takes over a minute)."""
    from PIL import Image, ImageOps

    with Image.open(file) as original:
        im = ImageOps.exif_transpose(original)
        if min(im.size) >= 2 * LARGE and im.mode in ("L", "RGB", "RGBA", "P", "CMYK", "I;16", "I", "F"):
            im = (im if im.mode not in ("P", "CMYK") else im.convert("RGB")).reduce(min(im.size) // LARGE)
        if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):  # PNG's 16 bits
            gray = np.asarray(im, dtype=np.float64) / 65535
        elif im.mode == "F":
            gray = np.asarray(im, dtype=np.float64)
            if not (np.isfinite(gray).all() and gray.min() >= 0 and gray.max() <= 1):
                raise ValueError(f"its floating-point pixels span [{gray.min():.4g}, {gray.max():.4g}], "
                                 "not [0, 1]")
        elif im.mode == "I":
            raise ValueError("32-bit integer pixels have no known white level; save it with 8 or 16 bits")
        else:
            return np.asarray(im.convert("RGB"))
    return np.repeat(gray[..., None], 3, axis=-1)


MAX_FILE = 1 << 30  # bytes: larger files are refused before they are read


def read_regular_file(path: str) -> bytes:
    """A regular file's bytes. A FIFO would block for ever and a device (/dev/zero) read
    until memory runs out: opened without blocking and refused unless regular."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file (a FIFO, a device or a socket)")
        if info.st_size > MAX_FILE:
            raise ValueError(f"{info.st_size / 2**30:.1f} GiB, larger than any file this reads ({MAX_FILE >> 30} GiB)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def content_hash(data: bytes) -> str:
    """The first 10 hex digits of the bytes' SHA-256: how the record tells files apart."""
    return hashlib.sha256(data).hexdigest()[:10]


def content_name(name: str, data: bytes) -> str:
    """A file as the record names it, by its name and content ('w.pt@3fa2b1c0d9'): the same
    file from any folder, and another after an edit."""
    return f"{name}@{content_hash(data)}"


def load_files(paths: list[str], label: int, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> list[PrivateImage]:
    """The user's image files as inputs of `shape` (fit_image); the same image (the same
    bytes) given twice counts once. Each is named by its file name and a hash of its bytes:
    two files of one name are two images, and a resumed run finds its images however their
    paths are spelled."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape = tuple(shape)
    as_given = f"{h}x{w} {'RGB' if c == 3 else 'grayscale'}"

    out, converted = {}, []
    for p in paths:
        try:
            data = read_regular_file(p)  # read once: hashed, then decoded
            if len(data) > 32 << 20:
                say(f"reading {printable(p, 200)} ({len(data) >> 20} MB) and shrinking it to {h}x{w}")
            digest, rgb = hashlib.sha256(data).hexdigest(), read_image(io.BytesIO(data))
            with Image.open(io.BytesIO(data)) as im:  # its header: what the file was before conversion
                if im.mode != ("RGB" if c == 3 else "L") or im.size != (w, h):
                    converted.append(f"{printable(Path(p).name, 60)}, {im.size[0]}x{im.size[1]} {im.mode}")
        except UnidentifiedImageError:  # its message names the BytesIO, not the file
            raise UserError(f"cannot read image {printable(p, 200)}: not an image file Pillow knows") from None
        except Exception as e:  # Pillow's decoders raise OSError, ValueError, SyntaxError, DecompressionBombError...
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise UserError(f"cannot read image {printable(p, 200)}: {printable(why, 200)}") from None
        name = f"file:{printable(Path(p).name, 60)}@{digest[:10]}"
        out.setdefault(name, PrivateImage(name, to_model_space(fit_image(rgb, shape)), label))
    if converted:
        warn(f"{len(converted)} of the {len(paths)} --image files {'is' if len(converted) == 1 else 'are'} not "
             f"{as_given} (e.g. {converted[0]}): attacked centre-cropped, resized to {h}x{w}, as "
             f"{as_given.split()[1]} (--input-shape sets it)")
    return list(out.values())


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def image_files(paths: list[str]) -> list[str]:
    """Files as given; a folder stands for its regular image files, sorted by name (a FIFO
    or a device in it is skipped, with a warning: a folder may hold what a user did not put
    there; a path given by name is read, or refused)."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            named = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            for f in named:
                if not f.is_file():
                    warn(f"{printable(str(f), 200)} is not a regular file; skipped")
            files = [str(f) for f in named if f.is_file()]
            if not files:
                raise UserError(f"no image files in folder {path}")
            out += files
        else:
            out.append(str(path))
    return out


def load_images(exp: Experiment, analysing: bool = False) -> tuple[list[PrivateImage], str]:
    """The images to attack (or to analyse, which downloads nothing), and the source they
    actually came from (results.json records it): a dataset's training set (CIFAR-10's is
    the published code's) or test set, the bundled photographs, or the user's files. Where
    a training set is out of reach, the same image indices of its test set, as foolbox
    ships them, and the run says so."""
    if exp.image_files:
        return load_files(image_files(exp.image_files), exp.label, exp.input_shape), "files"
    if exp.source == "samples":
        return load_photographs(exp.image_indices), "samples"
    name, train = dataset_of(exp.source)
    if train:
        images = load_split(exp.source, exp.image_indices, exp.data, download=not analysing)
        if not isinstance(images, str):
            return images, exp.source
        why = images
        images, _ = load_test_split(exp.source, exp.image_indices, exp.data, download=not analysing)
        if not analysing:
            warn(why)
        warn(f"{'analysing' if analysing else 'attacking'} {DATASETS[name].shown} test "
             f"image{'s' if len(images) > 1 else ''} {', '.join(i.name for i in images)} instead (its first 20 "
             "ship with foolbox)" + (f": {why}" if analysing else ""))
    else:
        images, _ = load_test_split(exp.source, exp.image_indices, exp.data, download=not analysing)
    return images, f"{name}-test"


# =============================================================================
# Models: the published code's zoo of small CNNs
# =============================================================================


# An architecture is one string: convolutions OUTkKsSpP[b]-ACT, comma-separated, then
# fc-ACT. OUT output channels, kernel K, stride S, zero padding P, b: the convolution has a
# bias; ACT tanh, sigmoid, softplus, id, leaky (slope 0.01) or leakyA (slope A). Input
# channels follow from the layer before (the data's first), the input is the data's
# (3x32x32 for CIFAR, 1x28x28 for MNIST), and the fc layer has a bias and one output per
# class. This grammar is the interface: scripts rely on it.
ACTIVATIONS = ("tanh", "sigmoid", "softplus", "id", "leaky")
CONV_PATTERN = re.compile(r"(\d+)k(\d+)s(\d+)p(\d+)(b?)-([a-z]+[0-9.]*)")
FC_PATTERN = re.compile(r"fc-([a-z]+[0-9.]*)")
MAX_SYSTEM_GIB = 4.0  # a convolution's U in float64 above this is refused (24 GiB machines; the QR copies it)


class Conv(NamedTuple):
    out: int
    kernel: int
    stride: int
    padding: int
    bias: bool
    act: str  # tanh sigmoid softplus id leaky leakyA, in its canonical spelling (canonical_activation)


class Arch(NamedTuple):
    convs: tuple[Conv, ...]
    fc_act: str

    def __str__(self) -> str:
        return ",".join([f"{c.out}k{c.kernel}s{c.stride}p{c.padding}{'b' * c.bias}-{c.act}" for c in self.convs]
                        + [f"fc-{self.fc_act}"])


# The published code's zoo, as architecture strings.
MODELS: dict[str, str] = {
    "cnn2_c0": "1k3s2p0-tanh,fc-tanh",
    "cnn2_c1": "6k3s1p0-tanh,fc-id",
    "cnn2_c2": "6k4s2p0-tanh,fc-id",
    "cnn2_c4": "1k3s1p0-tanh,fc-tanh",
    "cnn2_c5": "3k3s1p1-tanh,fc-tanh",
    "cnn2_c6": "12k5s2p0-tanh,fc-id",
    "cnn2_c11": "6k3s1p0-leaky,fc-sigmoid",
    "cnn2_c21": "6k4s2p0-leaky,fc-sigmoid",
    "cnn2_c41": "1k3s1p0-leaky,fc-sigmoid",
    "cnn3_c1": "6k3s1p0-tanh,3k4s2p0-tanh,fc-id",
    "cnn3_c2": "6k4s2p0-tanh,3k3s2p0-tanh,fc-id",
    "cnn3_c3": "6k3s1p0-tanh,9k3s1p0-tanh,fc-id",
    "cnn3_c4": "1k3s1p0-tanh,6k3s1p0-tanh,fc-id",
    "cnn3_c5": "12k5s1p1-tanh,12k5s2p2-tanh,fc-id",
    "cnn3_c6": "6k3s1p0-leaky,3k4s2p0-leaky,fc-tanh",
    "cnn3_c7": "6k3s1p0-tanh,3k4s2p0-leaky,fc-tanh",
    "cnn3_c8": "9k3s1p0-tanh,3k4s2p0-tanh,fc-tanh",
    "cnn3_c9": "5k3s1p0-tanh,7k3s1p0-tanh,fc-tanh",
    "cnn3_c11": "6k3s1p0-leaky,3k4s2p0-leaky,fc-sigmoid",
    "cnn3_c12": "6k3s1p0-softplus,3k4s2p0-softplus,fc-sigmoid",
    "cnn3_c13": "6k3s1p0-tanh,3k4s2p0-tanh,fc-sigmoid",
    "cnn3_c14": "6k3s1p0-id,3k4s2p0-id,fc-sigmoid",
    "cnn3_c15": "6k3s1p0-id,3k4s2p0-id,fc-tanh",
    "cnn3_c21": "6k4s2p0-leaky,3k3s2p0-leaky,fc-sigmoid",
    "cnn3_c22": "6k4s2p0-softplus,3k3s2p0-softplus,fc-sigmoid",
    "cnn3_c31": "6k3s1p0-leaky,9k3s1p0-leaky,fc-sigmoid",
    "cnn3_c32": "6k3s1p0-softplus,9k3s1p0-softplus,fc-sigmoid",
    "cnn3_c41": "1k3s1p0-leaky,6k3s1p0-leaky,fc-sigmoid",
    "cnn3_c42": "1k3s1p0-softplus,6k3s1p0-softplus,fc-sigmoid",
    "cnn4_c1": "6k3s1p0-tanh,5k4s2p0-tanh,3k4s1p0-tanh,fc-id",
    "cnn4_c2": "16k5s1p0-tanh,6k5s2p0-tanh,32k5s1p2-tanh,fc-id",
    "cnn4_c3": "6k5s1p0-tanh,16k5s2p0-tanh,16k5s1p2-tanh,fc-id",
    "lenet2": "12k3s2p1-tanh,12k5s2p2-tanh,12k5s1p2-tanh,fc-id",
    "lenet": "12k5s2p2b-leaky,12k5s2p2b-leaky,12k5s1p2b-leaky,fc-id",
    # R-GAP's rank-deficient CNN6-d (Zhu and Blaschko, ICLR 2021): its CNN6 has 12->36->36
    # in the first convolutions, CNN6-d narrows the second to 20 channels.
    "cnn6d": "12k4s2p2-leaky0.2,20k3s2p1-leaky0.2,36k3s1p1-leaky0.2,36k3s1p1-leaky0.2,64k3s2p1-leaky0.2,"
             "128k3s1p1-leaky0.2,fc-id",
}


def leaky_slope(act: str) -> float | None:
    """The negative slope of 'leaky' (0.01) or 'leakyA' (A); None for the other activations."""
    if not act.startswith("leaky"):
        return None
    return 0.01 if act == "leaky" else float(act[5:])


def check_activation(act: str, where: str) -> None:
    if act in ACTIVATIONS or re.fullmatch(r"leaky(\d+\.?\d*|\.\d+)", act):
        if leaky_slope(act) == 0:
            raise UserError(f"{where}: '{act}' is a ReLU, which cannot be inverted (give a slope above 0)")
        return
    raise UserError(f"{where}: unknown activation '{act}' (tanh, sigmoid, softplus, id, leaky or leakyA, "
                    "e.g. leaky0.2)")


def canonical_activation(act: str) -> str:
    """An activation as its one spelling: leaky, leaky0.01 and leaky.01 are one leaky ReLU,
    'leaky' (the default slope); another slope as a plain decimal (leaky0.2)."""
    slope = leaky_slope(act)
    if slope is None:
        return act
    return "leaky" if slope == 0.01 else "leaky" + np.format_float_positional(slope, trim="-")


def shown_architecture(text: str) -> str:
    """An architecture string as a message echoes it: cut short, so that a long one leaves room
    for the reason."""
    return printable(text, 80)


def parse_architecture(text: str, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> Arch:
    """An architecture string (above) as an Arch, every layer checked on inputs of `shape`;
    a bad one is a UserError naming the layer and why."""
    parts, shown = text.split(","), shown_architecture(text)
    convs = []
    for i, part in enumerate(parts[:-1]):
        where = f"architecture '{shown}', layer {i} '{printable(part, 60)}'"
        m = CONV_PATTERN.fullmatch(part)
        if m is None:
            why = ("fc must be the last layer" if part.startswith("fc")
                   else "a leaky ReLU's slope is a decimal (leaky0.001), not written with an exponent"
                   if re.search(r"-leaky[0-9.]*e", part) else "expected OUTkKsSpP[b]-ACT, e.g. 16k5s1p0-tanh")
            raise UserError(f"{where}: {why}")
        check_activation(m[6], where)
        convs.append(Conv(*map(int, m.groups()[:4]), m[5] == "b", canonical_activation(m[6])))
    fc = FC_PATTERN.fullmatch(parts[-1])
    if fc is None:
        raise UserError(f"architecture '{shown}': it must end in fc-ACT (e.g. fc-id), not '{printable(parts[-1], 60)}'")
    check_activation(fc[1], f"architecture '{shown}', its fc layer")
    if not convs:
        raise UserError(f"architecture '{shown}': it needs a convolution before fc (the attacks solve their systems)")
    arch = Arch(tuple(convs), canonical_activation(fc[1]))
    layer_shapes(arch, text, shape)
    return arch


def layer_shapes(arch: Arch, text: str = "",
                 shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> list[tuple[int, int, int]]:
    """The input shape (C, H, W) of every layer on inputs of `shape`, the fc's last; a layer
    that cannot follow the one before, or whose system U would not fit in memory, is a
    UserError."""
    shapes, (c, h, w) = [], shape
    for i, conv in enumerate(arch.convs):
        bad = lambda why, i=i: UserError(f"architecture '{shown_architecture(text or str(arch))}', layer {i} "
                                         f"'{str(arch).split(',')[i]}': {why}")  # noqa: E731
        if 0 in (conv.out, conv.kernel, conv.stride):
            what = "0 output channels" if conv.out == 0 else "kernel 0" if conv.kernel == 0 else "stride 0"
            raise bad(f"with {what} its output would be empty")
        if conv.kernel > min(h, w) + 2 * conv.padding:
            raise bad(f"kernel {conv.kernel} is larger than its padded input ({h}x{w} with padding {conv.padding})")
        shapes.append((c, h, w))
        c, h, w = conv.out, (h + 2 * conv.padding - conv.kernel) // conv.stride + 1, \
            (w + 2 * conv.padding - conv.kernel) // conv.stride + 1
        gib = 8 * math.prod(system_size(shapes[-1], (c, h, w), conv.kernel)) / 2**30
        if gib > MAX_SYSTEM_GIB:
            raise bad(f"its linear system would take {gib:.1f} GiB in float64 (the limit is {MAX_SYSTEM_GIB:g} GiB)")
    shapes.append((c, h, w))
    return shapes


def system_size(shape_in: tuple[int, int, int], shape_out: tuple[int, int, int], kernel: int) -> tuple[int, int]:
    """U of a convolution: (C_out H' W' forward rows + C_out C_in k^2 gradient rows,
    C_in H W unknowns)."""
    (ci, h, w), (co, ho, wo) = shape_in, shape_out
    return co * ho * wo + co * ci * kernel * kernel, ci * h * w


# --model random:N[@SEED]: N architectures drawn by one documented sampler, so a study can
# test the indices on architectures nobody chose. Each draw: 1-4 convolutions, each with
# 1-32 output channels, kernel 3-5, stride 1-2, padding 0-2, no bias, and one of the five
# activations (leaky: slope 0.01); the fc's activation from id, tanh and sigmoid. Draws that
# do not fit together, repeat an earlier draw, or cost more than cnn4_c2 are rejected:
# RANDOM_COST bounds the solves (sum over convolutions of max(m, n) min(m, n)^2, the flops of
# a QR of U up to a constant; cnn4_c2: 2.7e11, cnn3_c5 5.4e11 and cnn6d 6.2e11 would be
# rejected), RANDOM_UNKNOWNS the hybrid's Adam steps (the unknowns of all layers; cnn4_c2
# 16480) and RANDOM_SYSTEM_MIB the memory of the largest U (cnn4_c2: 322 MiB). What that
# costs in seconds and memory: docs/usage.md.
RANDOM_SEED = 0
RANDOM_COST, RANDOM_UNKNOWNS, RANDOM_SYSTEM_MIB = 3e11, 20000, 512
RANDOM_FC_ACTIVATIONS = ("id", "tanh", "sigmoid")


def solve_cost(arch: Arch, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> tuple[float, int, float]:
    """(the solves' flops up to a constant, all convolutions' unknowns, the largest U in MiB)."""
    shapes, flops, mib = layer_shapes(arch, shape=shape), 0.0, 0.0
    for conv, shape_in, shape_out in zip(arch.convs, shapes, shapes[1:]):
        m, n = system_size(shape_in, shape_out, conv.kernel)
        flops += max(m, n) * min(m, n) ** 2
        mib = max(mib, 8 * m * n / 2**20)
    return flops, sum(math.prod(shape) for shape in shapes[:-1]), mib


def within_random_bound(arch: Arch, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> bool:
    flops, unknowns, mib = solve_cost(arch, shape)
    return flops <= RANDOM_COST and unknowns <= RANDOM_UNKNOWNS and mib <= RANDOM_SYSTEM_MIB


def random_architectures(n: int, seed: int = RANDOM_SEED, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> list[str]:
    """The sampler above: n distinct architecture strings for inputs of `shape`, the same
    for the same seed and shape."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(1000 * n + 1000):
        convs = [f"{rng.integers(1, 33)}k{rng.integers(3, 6)}s{rng.integers(1, 3)}p{rng.integers(0, 3)}-"
                 f"{rng.choice(ACTIVATIONS)}" for _ in range(rng.integers(1, 5))]
        text = ",".join([*convs, f"fc-{rng.choice(RANDOM_FC_ACTIVATIONS)}"])
        try:
            arch = parse_architecture(text, shape)
        except UserError:
            continue  # a kernel larger than its input, or a system too large
        if within_random_bound(arch, shape) and text not in out:
            out.append(text)
            if len(out) == n:
                return out
    raise UserError(f"random:{n}@{seed}: the sampler found only {len(out)} architectures within its bound")


@functools.cache
def architecture(model: str, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> Arch:
    """A zoo name's architecture, or the architecture a string gives, checked for inputs of
    `shape` (parsed once a process: rows, figure points and entries all ask for it)."""
    return parse_architecture(MODELS.get(model, model), shape)


class Net(nn.Module):
    """Convolutions then linear layers (one, as published); x = act(layer(x)) for each
    (layer, activation)."""

    def __init__(self, layers: list[nn.Module], acts: list[nn.Module], shapes: list[tuple]):
        super().__init__()
        self.layers, self.acts = nn.ModuleList(layers), nn.ModuleList(acts)
        self.shapes = shapes  # input shape (C, H, W) of every layer, the fc's last
        self.first_linear = next(i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear))
        # What a captured gradient (--gradient) calls the parameters: for a module read by
        # read_module, the module's own names (`names`, in this chain's order) and every one
        # of its parameters in its parameters() order (`listed`, a list file's order).
        self.names = [name for name, _ in self.named_parameters()]
        self.listed = list(self.names)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Layers start..L-1: f_{l:} of the paper when start = l."""
        for layer, act in zip(self.layers[start:], self.acts[start:]):
            if isinstance(layer, nn.Linear):
                x = x.flatten(1)
            x = act(layer(x))
        return x


def make_activation(name: str) -> nn.Module:
    if name.startswith("leaky"):
        return nn.LeakyReLU(leaky_slope(name))
    return {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "id": nn.Identity}[name]()


def build_model(name: str, seed: int = PUBLISHED_SEED, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE,
                classes: int = PHOTOGRAPH_CLASSES, weights: str | None = None, weights_name: str | None = None) -> Net:
    """A zoo model or an architecture string for inputs of `shape` and `classes` classes,
    initialised as published: seed, then PyTorch's default init, layer by layer (so a zoo
    model's string gives its weights). PATH.py:NAME is your own module (module_model).
    `weights`: a state_dict file, which must still be `weights_name` (content_name) where given."""
    if is_model_file(name):
        return module_model(name, seed, shape, classes, weights, weights_name)
    arch = architecture(name, shape)
    shapes = layer_shapes(arch, shape=shape)
    seed_everything(seed)
    layers: list[nn.Module] = [nn.Conv2d(shape[0], conv.out, conv.kernel, conv.stride, conv.padding, bias=conv.bias)
                               for conv, shape in zip(arch.convs, shapes)]
    layers.append(nn.Linear(math.prod(shapes[-1]), classes))
    acts = [make_activation(conv.act) for conv in arch.convs] + [make_activation(arch.fc_act)]
    model = Net(layers, acts, shapes)
    if weights is not None:
        load_weights(model, weights, weights_name)
    return model


def weights_content(path: str) -> tuple[bytes, str]:
    """--weights FILE's bytes and its content_name, read once (a FIFO is refused, not waited on)."""
    try:
        data = read_regular_file(path)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"--weights {printable(path, 200)}: cannot be read ({printable(why, 200)})") from None
    return data, content_name(printable(Path(path).name, 60), data)


def load_weights(model: nn.Module, path: str, name: str | None = None) -> None:
    """A state_dict from `path` into `model`, every tensor in place (strict): a key or a shape
    that does not match is a UserError naming it; so is a file that is no longer `name`, the
    content the run began with (an edit between cells, or between a stop and --resume)."""
    where = f"--weights {printable(path, 200)}"
    data, now = weights_content(path)
    if name is not None and now != name:
        raise UserError(f"{where}: the file has changed since the run began (it was {name}, it is {now})")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that is not tensors
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {str(e).splitlines()[0]}"
        raise UserError(f"{where}: cannot be read as a state_dict ({printable(why, 200)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{where}: holds a {type(state).__name__}, not a state_dict (a dict of tensors)")
    own = model.state_dict()
    missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing:
        raise UserError(f"{where}: has no '{missing[0]}' (it holds {', '.join(sorted(state)[:4])}...)")
    if extra:
        raise UserError(f"{where}: its '{extra[0]}' is no parameter of the model ({', '.join(sorted(own)[:4])}...)")
    wrong = next((key for key, value in state.items() if value.shape != own[key].shape), None)
    if wrong is not None:
        raise UserError(f"{where}: '{wrong}' is {tuple(state[wrong].shape)}, the model's {tuple(own[wrong].shape)}")
    model.load_state_dict(state)


def draw_uniform(model: nn.Module, a: float, seed: int) -> None:
    """--init uniform:A: every parameter uniform(-A, A), in the model's order, after seeding."""
    seed_everything(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-a, a)


def init_value(text: str) -> str:
    """'uniform:0.5' as given, checked (A > 0, finite)."""
    kind, _, value = text.partition(":")
    try:
        a = float(value)
    except ValueError:
        a = float("nan")
    if kind != "uniform" or not (math.isfinite(a) and a > 0):
        raise argparse.ArgumentTypeError(f"--init {printable(text, 60)}: expected uniform:A with A > 0, "
                                         "e.g. uniform:0.5")
    return f"uniform:{np.format_float_positional(a, trim='-')}"


# -- --model PATH.py:NAME: your own nn.Module, read with torch.fx into the layer sequence ---
# The attacks need a chain: convolutions, each followed by at most one invertible
# activation, a flatten, then linear layers, each with a bias (its input follows from its
# own gradient: gW = d a^T, gb = d). read_module traces the module (torch.fx) and takes
# that chain from the graph, refusing anything else by name; the layers are the module's
# own, so are the weights. The Net it gives is checked against the module's own forward.

INVERTIBLE_MODULES = (nn.Tanh, nn.Sigmoid, nn.Softplus, nn.LeakyReLU, nn.Identity)
# what is refused, and why: by module class or function name, lower case, without underscores
# (nn.MaxPool2d and F.max_pool2d are one entry; F.relu_ is F.relu)
NOT_INVERTIBLE = {"relu": "ReLU is not invertible (a leaky ReLU is: nn.LeakyReLU)",
                  "relu6": "ReLU6 is not invertible", "gelu": "GELU is not invertible on its whole range",
                  "silu": "SiLU is not invertible on its whole range", "elu": "ELU is not supported",
                  "maxpool2d": "pooling discards what the attacks solve for", "avgpool2d": "pooling is not supported",
                  "batchnorm2d": "batch normalisation couples the batch and is not supported",
                  "add": "a residual addition: the attacks need a chain of layers",
                  "cat": "a concatenation: the attacks need a chain of layers",
                  "dropout": "dropout makes the gradient depend on a random mask"}


def call_name(node) -> str:
    """What a torch.fx node calls: a method's name ('view'), a function's ('leaky_relu')."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def functional_activation(node) -> nn.Module | None:
    """The activation module a torch.fx call (torch.tanh, F.softplus(x, beta=2), x.sigmoid(),
    F.leaky_relu(x, 0.2), ...) stands for, or None where it is none of them."""
    name, kwargs = call_name(node), dict(node.kwargs)
    if name in ("tanh", "sigmoid"):
        return nn.Tanh() if name == "tanh" else nn.Sigmoid()
    if name == "softplus":
        beta = node.args[1] if len(node.args) > 1 else kwargs.get("beta", 1.0)
        threshold = node.args[2] if len(node.args) > 2 else kwargs.get("threshold", 20.0)
        return nn.Softplus(beta, threshold)
    if name == "leaky_relu":
        return nn.LeakyReLU(node.args[1] if len(node.args) > 1 else kwargs.get("negative_slope", 0.01))
    return None


def is_size(node, helpers: set) -> bool:
    """x.size(0), x.shape and x.shape[0]: sizes a view or a reshape is given."""
    import operator

    if node.op == "call_method":
        return node.target == "size"
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] == "shape"
    return node.op == "call_function" and node.target is operator.getitem and node.args[0] in helpers


def is_flatten(node, module: nn.Module | None) -> bool:
    """nn.Flatten, torch.flatten(x, 1), x.flatten(1), x.view(x.size(0), -1), x.reshape(...)."""
    if module is not None:
        return isinstance(module, nn.Flatten)
    return call_name(node) in ("flatten", "view", "reshape")


def read_module(net: nn.Module, shape: tuple[int, int, int], where: str = "the model") -> Net:
    """The attacks' layer sequence of `net` on inputs of `shape`: its own Conv2d and Linear
    layers and its activations, as a Net; anything else a UserError naming the layer or call
    and why."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(net).graph
    except Exception as e:  # data-dependent control flow, and the like
        raise UserError(f"{where}: torch.fx cannot trace it ({type(e).__name__}: {printable(str(e), 200)})") from None
    modules = dict(net.named_modules())
    layers, acts, flattened, data, helpers = [], [], False, None, set()
    for node in graph.nodes:
        if node.op == "placeholder":
            data = node if data is None else data
            continue
        if node.op == "output":
            if node.args[0] is not data:
                raise UserError(f"{where}: its output is not the end of its chain of layers")
            break
        module = modules[node.target] if node.op == "call_module" else None
        what = (f"{type(module).__name__} '{node.target}'" if module is not None
                else f"'{getattr(node.target, '__name__', node.target)}'")
        name = type(module).__name__ if module is not None else call_name(node)
        if node.op == "get_attr":
            raise UserError(f"{where}: {what} reads a parameter directly (F.conv2d(x, self.w)?); "
                            "use nn.Conv2d and nn.Linear modules")
        if is_size(node, helpers):  # x.size(0), x.shape[0]: a view's arguments, not a layer
            helpers.add(node)
            continue
        if not node.args or node.args[0] is not data:
            raise UserError(f"{where}: {what} does not take the output of the layer before "
                            "(the attacks need a chain of layers)")
        if any(isinstance(a, torch.fx.Node) and a is not data and a not in helpers for a in node.args[1:]):
            raise UserError(f"{where}: {what} combines two branches ({NOT_INVERTIBLE['add']})")
        data = node
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            check_layer(module, what, where, flattened, layers)
            layers.append(module)
            acts.append(None)
            continue
        act = module if isinstance(module, INVERTIBLE_MODULES) else None if module else functional_activation(node)
        if act is not None:
            if not layers or acts[-1] is not None:
                raise UserError(f"{where}: {what} follows no Conv2d or Linear of its own (one activation per layer)")
            if isinstance(act, nn.LeakyReLU) and act.negative_slope <= 0:
                raise UserError(f"{where}: {what} has slope {act.negative_slope}: {NOT_INVERTIBLE['relu']}")
            acts[-1] = act
            continue
        if is_flatten(node, module):
            flattened = True
            continue
        why = NOT_INVERTIBLE.get(name.lower().replace("_", ""), "not a layer the attacks can invert")
        raise UserError(f"{where}: {what}: {why} (supported: Conv2d, Linear, Tanh, Sigmoid, Softplus, "
                        "LeakyReLU, Identity and a flatten)")
    if not layers or not isinstance(layers[-1], nn.Linear):
        raise UserError(f"{where}: it must end in an nn.Linear (R-GAP starts from the last layer's gradient)")
    if not isinstance(layers[0], nn.Conv2d):
        raise UserError(f"{where}: it needs a convolution before its linear layers (the attacks solve their systems)")
    model = Net(layers, [a if a is not None else nn.Identity() for a in acts], module_shapes(layers, shape, where))
    check_reproduces(net, model, shape, where)
    own = {id(p): name for name, p in net.named_parameters()}  # the layers are the module's: its parameters too
    model.names, model.listed = [own[id(p)] for p in model.parameters()], list(own.values())
    return model


# A module model has two spellings. The command line's, PATH.py:NAME, is the only one that is
# ever imported; settings_from adds its content's hash (PATH.py:NAME@HASH) and the run loads
# that file only while it still has those bytes. The record names it without its folder
# (FILE.py:NAME@HASH: RECORDED_MODULE), as images and gradients are named, so that the same
# file from another folder is the same model, an edited file another one, and no record
# names anything that could be loaded (docs/output.md, "What reading a run folder can do").
MODEL_FILE = re.compile(r"(?P<path>.+\.py):(?P<name>[A-Za-z_]\w*)(?:@(?P<hash>[0-9a-f]{10}))?")
RECORDED_MODULE = re.compile(r"(?P<file>[^/\\]+\.py):(?P<name>[A-Za-z_]\w*)@(?P<hash>[0-9a-f]{10})")


def is_model_file(model: str) -> bool:
    return MODEL_FILE.fullmatch(model) is not None


def is_module_model(model: str) -> bool:
    """A module's model, in either spelling, or as a record written before hashes names it."""
    return is_model_file(model) or RECORDED_MODULE.fullmatch(model) is not None


def recorded_model(model: str) -> str:
    """The model as the record names it: a module's FILE.py:NAME@HASH, without its folder."""
    m = MODEL_FILE.fullmatch(model)
    if m is None or m["hash"] is None:
        return model
    return f"{Path(m['path']).name}:{m['name']}@{m['hash']}"


def module_source(model_file: str) -> tuple[str, bytes]:
    """The file of --model PATH.py:NAME[@HASH] (its path, and its bytes, read once), checked to
    be the content HASH names where it is given."""
    m = MODEL_FILE.fullmatch(model_file)
    where = f"--model {printable(model_file, 200)}"
    if not Path(m["path"]).is_file():
        raise UserError(f"{where}: no file {printable(m['path'], 200)}")
    try:
        data = read_regular_file(m["path"])
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"{where}: cannot be read ({printable(why, 200)})") from None
    now = content_hash(data)
    if m["hash"] is not None and now != m["hash"]:
        raise UserError(f"{where}: {printable(m['path'], 200)} has changed since the run began (its content "
                        f"was {m['hash']}, it is {now})")
    return m["path"], data


def hashed_model_file(model_file: str) -> str:
    """PATH.py:NAME as the run loads it: PATH.py:NAME@HASH, the hash of its bytes now."""
    m = MODEL_FILE.fullmatch(model_file)
    _, data = module_source(model_file)
    return f"{m['path']}:{m['name']}@{content_hash(data)}"


def load_module(model_file: str, seed: int) -> nn.Module:
    """--model PATH.py:NAME[@HASH]: NAME from that file, a class or a function, called with
    no arguments after seeding (its own initialisation, under --model-seed). The file is
    run from the bytes that were checked, never read a second time."""
    path, data = module_source(model_file)
    name = MODEL_FILE.fullmatch(model_file)["name"]
    where = f"--model {printable(model_file, 200)}"
    loader = importlib.util.spec_from_loader(f"model_file_{hashlib.sha256(path.encode()).hexdigest()[:8]}",
                                             loader=None, origin=path)
    source = importlib.util.module_from_spec(loader)
    source.__file__ = path
    try:
        exec(compile(data, path, "exec"), source.__dict__)  # the file the command names, and only it
    except Exception as e:  # the user's code: whatever it raises is theirs
        raise UserError(f"{where}: importing {printable(path, 200)} fails: {type(e).__name__}: "
                        f"{printable(str(e), 200)}") from None
    make = getattr(source, name, None)
    if not callable(make):
        raise UserError(f"{where}: {printable(path, 200)} defines no class or function {name}")
    seed_everything(seed)
    try:
        net = make()
    except Exception as e:
        raise UserError(f"{where}: {name}() fails: {type(e).__name__}: {printable(str(e), 200)}") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"{where}: {name}() gives a {type(net).__name__}, not an nn.Module")
    return net.float()


def module_model(model_file: str, seed: int, shape: tuple[int, int, int], classes: int,
                 weights: str | None = None, weights_name: str | None = None) -> Net:
    """The Net of --model PATH.py:NAME on inputs of `shape`: the module's own layers and
    weights (its initialisation, or the state_dict in `weights`)."""
    where = f"--model {printable(model_file, 200)}"
    net = load_module(model_file, seed)
    if weights is not None:
        load_weights(net, weights, weights_name)
    model = read_module(net, shape, where)
    if model.layers[-1].out_features != classes:
        raise UserError(f"{where}: it has {model.layers[-1].out_features} outputs, and the data {classes} classes")
    return model


@functools.cache
def module_layout(model_file: str, shape: tuple[int, int, int]) -> tuple[str, tuple[int, ...]]:
    """What the record says of a module model: its layers in the grammar's words (extended
    where the grammar has none: KxK' kernels, softplusB, a hidden fcN), and each layer's
    unknowns. Read once a process."""
    model = read_module(load_module(model_file, PUBLISHED_SEED), shape, f"--model {printable(model_file, 200)}")
    return describe(model), tuple(math.prod(s) for s in model.shapes[:-1])


def describe(model: Net) -> str:
    """A Net in the architecture grammar's words (the grammar's own string where it is one)."""
    def act_name(act: nn.Module) -> str:
        if isinstance(act, nn.LeakyReLU):
            return canonical_activation(f"leaky{np.format_float_positional(act.negative_slope, trim='-')}")
        if isinstance(act, nn.Softplus):
            return "softplus" if act.beta == 1 else f"softplus{act.beta:g}"
        return {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "id"}[type(act)]

    def pair(values: tuple) -> str:
        return str(values[0]) if values[0] == values[1] else "x".join(map(str, values))

    parts = []
    for i, (layer, act) in enumerate(zip(model.layers, model.acts)):
        if isinstance(layer, nn.Conv2d):
            parts.append(f"{layer.out_channels}k{pair(layer.kernel_size)}s{pair(layer.stride)}"
                         f"p{pair(layer.padding)}{'b' * (layer.bias is not None)}-{act_name(act)}")
        else:
            parts.append(f"fc{'' if i == len(model.layers) - 1 else layer.out_features}-{act_name(act)}")
    return ",".join(parts)


def check_layer(module: nn.Module, what: str, where: str, flattened: bool, layers: list[nn.Module]) -> None:
    if isinstance(module, nn.Linear):
        if module.bias is None:
            raise UserError(f"{where}: {what} has no bias: its input cannot be read from its gradient (bias=True)")
        return
    if layers and isinstance(layers[-1], nn.Linear) or flattened:
        raise UserError(f"{where}: {what} comes after the flatten: convolutions first, then linear layers")
    if module.groups != 1 or module.dilation != (1, 1):
        raise UserError(f"{where}: {what} has groups {module.groups} and dilation {module.dilation}: "
                        "only groups 1 and dilation 1 are supported")
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise UserError(f"{where}: {what}: give its padding as numbers, padded with zeros "
                        f"(not padding={module.padding!r}, padding_mode={module.padding_mode!r})")


def module_shapes(layers: list[nn.Module], shape: tuple[int, int, int], where: str) -> list[tuple]:
    """The input shape of every layer (a linear layer's: what its first one is flattened
    from, then its input size), from one forward of zeros; a size mismatch is a UserError."""
    shapes, x = [], torch.zeros(1, *shape, device=layers[0].weight.device)
    with torch.no_grad():
        for layer in layers:
            shapes.append(tuple(x.shape[1:]))
            try:
                x = layer(x.flatten(1) if isinstance(layer, nn.Linear) else x)
            except RuntimeError as e:
                raise UserError(f"{where}: on {'x'.join(map(str, shape))} inputs its layer {len(shapes) - 1} "
                                f"({type(layer).__name__}) fails: {printable(str(e).splitlines()[0], 200)}") from None
    return shapes


def check_reproduces(net: nn.Module, model: Net, shape: tuple[int, int, int], where: str) -> None:
    """The layer sequence must compute what the module computes: on a random input, to
    float rounding. (A forward that does more than its graph shows, say, is refused.)"""
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(model.layers[0].weight.device)
    with torch.no_grad():
        theirs, ours = net(x), model(x)
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-5, atol=1e-6):
        raise UserError(f"{where}: the layers read from it do not reproduce its forward")


def by_layer(model: Net, grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """A per-parameter list (the shared gradient) split by layer: [[gW_0 (, gb_0)], ..., [gW_fc, gb_fc]]."""
    entries = iter(grads)
    return [[next(entries) for _ in layer.parameters()] for layer in model.layers]


def gradients_from(model: Net, grads: list[torch.Tensor], layer: int) -> list[torch.Tensor]:
    """The shared gradient of the parameters of layers `layer`..L-1, in the model's order."""
    return [g for per_layer in by_layer(model, grads)[layer:] for g in per_layer]


# =============================================================================
# Weights: as published (random initialisation), or trained first
# =============================================================================
# The threat model takes the weights "from random initialisation or pre-training". With
# --train-steps K the model first takes K SGD steps on mini-batches of 32 images that are
# never the attacked one: CIFAR-10's other training images, or, offline (and for --image
# files), random crops of the bundled photographs other than the attacked one.

TRAIN_BATCH = 32
CROP_POOL = 2048  # crops made once per set of photographs; batches are drawn from them


@functools.cache
def photograph_crops(exclude: str, seed: int,
                     shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> tuple[torch.Tensor, torch.Tensor, str]:
    """random_crops of the bundled photographs other than `exclude`, and their names."""
    import skimage.data

    sources = [(name, torch.as_tensor(load(skimage.data)).permute(2, 0, 1)[None] / 255.0, label)
               for name, load, label in PHOTOGRAPHS if name != exclude]
    return *random_crops(sources, seed, shape), " ".join(name for name, _, _ in sources)


@functools.cache
def test_set_crops(name: str, exclude: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """random_crops of foolbox's test images of a dataset other than the attacked one."""
    sources = [(i, torch.as_tensor(pixels).permute(2, 0, 1)[None] / 255.0, label)
               for i, (pixels, label) in enumerate(foolbox_test_set(name)) if i != exclude]
    return random_crops(sources, seed, DATASETS[name].shape)


def random_crops(sources: list[tuple], seed: int, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """CROP_POOL random crops (a square of 30-100% of the shorter side, anywhere, flipped
    half the time) of the (name, (1, C, H, W) image in [0, 1], label) `sources`, resized to
    the model's H x W with anti-aliasing (and made gray for a 1-channel model), in model
    space, and their labels."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for i in torch.randint(len(sources), (CROP_POOL,), generator=g).tolist():
        _, photo, label = sources[i]
        h, w = photo.shape[-2:]
        side = int(min(h, w) * (0.3 + 0.7 * torch.rand(1, generator=g).item()))
        top, left = (int(torch.randint(n - side + 1, (1,), generator=g)) for n in (h, w))
        crop = F.interpolate(photo[..., top : top + side, left : left + side], size=shape[1:],
                             mode="bilinear", antialias=True, align_corners=False)
        if shape[0] == 1 and crop.shape[1] == 3:
            crop = torch.einsum("c,nchw->nhw", torch.tensor(LUMINANCE), crop)[:, None]
        xs.append(crop.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else crop)
        ys.append(label)
    return torch.cat(xs) - 0.5, torch.tensor(ys)


@functools.cache
def training_set(name: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset's training images (N, C, H, W, uint8 until batched) and labels, read once a
    process; OSError or RuntimeError where it is not on disk."""
    import torchvision

    data = getattr(torchvision.datasets, DATASETS[name].torchvision)(root=root, train=True, download=False)
    x = torch.as_tensor(np.asarray(data.data))  # CIFAR's NHWC numpy, MNIST's NHW tensor
    return (x.permute(0, 3, 1, 2) if x.ndim == 4 else x[:, None]), torch.as_tensor(data.targets)


def training_data(image: PrivateImage, seed: int, data_root: str,
                  classes: int = PHOTOGRAPH_CLASSES) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Images, labels and a description of the training set for a model attacked on `image`."""
    source, _, key = image.name.partition(":")
    if source in DATASETS:
        x, y = training_set(source, data_root)
        keep = torch.arange(len(x)) != int(key)  # every training image but the attacked one
        return x[keep], y[keep], f"{DATASETS[source].shown} training set less image {key}"
    name, train = dataset_of(source)
    if name in DATASETS and not train:
        shown = DATASETS[name].shown
        try:
            x, y = training_set(name, data_root)  # the attacked test image is not among them
            return x, y, f"{shown} training set"
        except (OSError, RuntimeError):  # offline: the other 19 test images that foolbox ships
            x, y = test_set_crops(name, int(key), seed)
            return x, y, f"{CROP_POOL} crops of {shown} test images 0-{FOOLBOX_IMAGES - 1} (foolbox's) less image {key}"
    shape = tuple(image.x.shape[1:])
    x, y, names = photograph_crops(key if source == "samples" else bundled_twin(image), seed, shape)
    return x, y % classes, f"{CROP_POOL} crops of the bundled photographs {names}"  # labels up to 5


def same_space(photo: PrivateImage, image: PrivateImage) -> torch.Tensor:
    """A photograph's x as `image` is normalised."""
    return photo.x if image.normalize == PUBLISHED_NORMALIZE else normalized(photo, *image.normalize).x


def bundled_twin(image: PrivateImage) -> str:
    """The bundled photograph that `image` is (an --image file of skimage's chelsea, say),
    after the same crop and resize: within 2/255 at every pixel; "" where there is none."""
    twins = [photo.name.partition(":")[2] for photo in all_photographs()
             if photo.x.shape == image.x.shape and float((same_space(photo, image) - image.x).abs().max()) <= 2 / 255]
    return twins[0] if twins else ""


def train(model: Net, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int,
          normalize: tuple = PUBLISHED_NORMALIZE) -> float:
    """`steps` SGD steps on random mini-batches of (x, y), seeded; the last batch's loss.
    The batches are normalised as the attacked image is (`normalize`)."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in normalize)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    device = next(model.parameters()).device
    loss = torch.tensor(float("nan"))
    for _ in progress(steps, "training"):
        batch = torch.randint(len(x), (TRAIN_BATCH,), generator=g)
        xb = x[batch] / 255.0 - 0.5 if x.dtype == torch.uint8 else x[batch]  # as to_model_space
        if normalize != PUBLISHED_NORMALIZE:
            xb = (xb + 0.5 - mean) / std
        loss = F.cross_entropy(model(xb.to(device)), y[batch].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def prepare_model(exp: Experiment, name: str, image: PrivateImage) -> tuple[Net, dict | None]:
    """The model the client holds when it computes its gradient on `image`, and what
    training it had (None: the published initialisation)."""
    classes = exp.classes or data_format(exp)[1]  # an Experiment made in Python leaves them to the data
    model = build_model(name, exp.model_seed, image.shape, classes, exp.weights, exp.weights_name)
    if exp.init:
        draw_uniform(model, float(exp.init.partition(":")[2]), exp.model_seed)
    model = model.to(exp.device)
    if exp.train_steps == 0:
        return model, None
    x, y, data = training_data(image, exp.model_seed, exp.data, classes)
    loss = train(model, x, y, exp.train_steps, exp.train_lr, exp.model_seed, image.normalize)
    diverged = not (math.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters()))
    return model, {"steps": exp.train_steps, "lr": exp.train_lr, "batch": TRAIN_BATCH, "seed": exp.model_seed,
                   "data": data, "final_loss": loss if math.isfinite(loss) else None, "diverged": diverged}


# =============================================================================
# The client's gradient: the only code that sees the private image (or, with --gradient,
# the gradient a client shared, captured elsewhere)
# =============================================================================


def client_gradient(model: Net, x: torch.Tensor, label: int) -> list[torch.Tensor]:
    """What the client shares: d CE(model(x), label) / d theta, one tensor per parameter."""
    loss = F.cross_entropy(model(x), torch.tensor([label], device=x.device))
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


class Captured(NamedTuple):
    """A gradient a client shared, captured elsewhere (--gradient FILE.pt): its tensors as the
    file holds them, and the input (C, H, W) it was computed on."""

    name: str  # "gradient:FILE@HASH": the file's name and the first 10 hex digits of its bytes' SHA-256
    where: str  # as a message names it: "--gradient FILE"
    tensors: tuple | dict  # in model.parameters() order, or by parameter name (None: a parameter unused)
    shape: tuple[int, int, int]


def load_gradient(path: str, shape: tuple[int, int, int]) -> Captured:
    """--gradient FILE.pt: `[p.grad for p in model.parameters()]` or `{n: p.grad for n, p in
    model.named_parameters()}` as torch.save wrote it; anything else a UserError."""
    where = f"--gradient {printable(path, 200)}"
    try:
        data = read_regular_file(path)
        tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a missing file, a FIFO, a pickle that is not tensors
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {str(e).splitlines()[0]}"
        raise UserError(f"{where}: cannot be read as saved tensors ({printable(why, 200)})") from None
    name = "gradient:" + content_name(printable(Path(path).name, 60), data)
    return as_captured(tensors, name, where, shape)


def as_captured(tensors: object, name: str, where: str, shape: tuple[int, int, int]) -> Captured:
    """A list (or tuple) of tensors or a dict of them by name, as a Captured; anything else a
    UserError."""
    is_grad = lambda t: t is None or isinstance(t, torch.Tensor)  # noqa: E731  (an unused parameter's grad is None)
    if isinstance(tensors, (list, tuple)) and tensors and all(map(is_grad, tensors)):
        tensors = tuple(tensors)
    elif not (isinstance(tensors, dict) and tensors and all(isinstance(k, str) and is_grad(v)
                                                            for k, v in tensors.items())):
        raise UserError(f"{where}: holds a {type(tensors).__name__}, not a gradient: a list of tensors in "
                        "model.parameters() order, or a dict of them by parameter name")
    return Captured(name, where, tensors, tuple(int(n) for n in shape))


def captured_gradient(model: Net, captured: Captured) -> list[torch.Tensor]:
    """A captured gradient as the attacks take it: a tensor per parameter of the model's
    chain, in its order, on its device; a count, a name or a shape that does not match the
    model, a value that is not finite, or a gradient that is exactly zero, a UserError
    naming it. (A parameter outside the chain, unused by the forward, is left out.)"""
    where = captured.where
    some = f"({', '.join(model.listed[:4])}{', ...' * (len(model.listed) > 4)})"  # the model's parameters, named
    if isinstance(captured.tensors, tuple):
        if len(captured.tensors) != len(model.listed):
            raise UserError(f"{where}: holds {len(captured.tensors)} tensors, and the model has {len(model.listed)} "
                            f"parameters {some}")
        by_name = dict(zip(model.listed, captured.tensors))
    else:
        by_name = captured.tensors
        extra = next((name for name in by_name if name not in model.listed), None)
        if extra is not None:
            raise UserError(f"{where}: its '{printable(extra, 80)}' is no parameter of the model {some}")
    out = []
    for name, p in zip(model.names, model.parameters()):
        g = by_name.get(name)
        if g is None:
            raise UserError(f"{where}: has no gradient for '{name}'")
        if g.shape != p.shape:
            raise UserError(f"{where}: '{name}' is {tuple(g.shape)}, the model's {tuple(p.shape)}")
        if not torch.isfinite(g).all():
            raise UserError(f"{where}: '{name}' holds values that are not finite")
        out.append(g.detach().to(p.device, p.dtype))
    if not any(g.any() for g in out):
        raise UserError(f"{where}: is exactly zero, so it carries nothing to attack")
    return out


def shared_gradient(model: Net, image: PrivateImage, device: str) -> list[torch.Tensor]:
    """What the client shares on `image`: the gradient captured (--gradient), matched to the
    model's parameters, or the one it computes (client_gradient)."""
    if image.captured is not None:
        return captured_gradient(model, image.captured)
    return client_gradient(model, image.x.to(device), image.label)


def recover_label(grads: list[torch.Tensor]) -> int:
    """iDLG rule (Zhao et al., 2020): the only negative entry of the last layer's bias gradient."""
    return int(grads[-1].argmin())



# =============================================================================
# Linear systems: each layer's equations, and the recursion that solves them
# =============================================================================
#
# The recursion of R-GAP (Zhu and Blaschko, ICLR 2021), which the paper's hybrid shares.
# Layers are l = 0..L-1, the last one fully connected; a_{-1} is the image,
# z_l = layer_l(a_{l-1}) and a_l = act_l(z_l).
#
# 1. The linear layer z = W a + b has gradients gW = d a^T and gb = d (d = dL/dz), so
#    a = gW^T gb / (gb^T gb), and dL/da = W^T d.                          (invert_fc)
# 2. At each convolution, from l = L-2 down to 0, with the estimate of a_l and dL/da_l:
#    - z_l = act^-1(a_l), clipped to stay finite, and delta_l = dL/da_l * act'(z_l);
#    - the unknown x = a_{l-1}, flattened, satisfies two sets of linear equations:
#      the forward map M x = z_l - b_l (M: the convolution as a matrix) and the
#      gradient constraints G(delta_l) x = gW_l (G: x -> the weight gradient);
#    - x = the minimum-norm least-squares solution of U x = V, U = [M; G], V = [z - b; gW],
#      solved in float64, U first reduced to an orthogonally equivalent system with fewer
#      rows where its structure allows;  (layer_system, reduced_matrices, solve_min_norm)
#    - dL/da_{l-1} = M^T delta_l.
# The rank deficiency of layer l is r_l = rank(U) - n_l (n_l unknowns): 0 where its input
# is determined, -k where a k-dimensional family of inputs fits both sets of equations.

CLIP = 0.9999  # tanh and sigmoid outputs are clipped this close to their bounds


def inverse_activation(act: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """z with act(z) = a; inputs outside the range are clipped so every value is finite."""
    if isinstance(act, nn.Tanh):
        return torch.atanh(a.clamp(-CLIP, CLIP))
    if isinstance(act, nn.Sigmoid):
        a = a.clamp((1 - CLIP) / 2, (1 + CLIP) / 2)
        return torch.log(a / (1 - a))
    if isinstance(act, nn.LeakyReLU):
        return torch.where(a >= 0, a, a / act.negative_slope)
    if isinstance(act, nn.Softplus):  # log(expm1(beta a)) / beta, written to not overflow for large a
        a = (act.beta * a).clamp_min(1e-12)
        return (a + torch.log(-torch.expm1(-a))) / act.beta
    if isinstance(act, nn.Identity):
        return a
    raise TypeError(f"no inverse for {act}")


def activation_derivative(act: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """act'(z), elementwise."""
    if isinstance(act, nn.Tanh):
        return 1 - torch.tanh(z) ** 2
    if isinstance(act, nn.Sigmoid):
        return torch.sigmoid(z) * (1 - torch.sigmoid(z))
    if isinstance(act, nn.LeakyReLU):
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, act.negative_slope))
    if isinstance(act, nn.Softplus):
        return torch.sigmoid(act.beta * z)
    if isinstance(act, nn.Identity):
        return torch.ones_like(z)
    raise TypeError(f"no derivative for {act}")


def invert_fc(fc: nn.Linear, g_w: torch.Tensor, g_b: torch.Tensor,
              known: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Input a and dL/da of the linear layer from its gradients (step 1 above).

    gW = d a^T and gb = d, so a = gW^T gb / gb^T gb: the least-squares solution over
    all rows (the published code divided one row by one entry). Under pruning (`known`:
    the entries of gW and gb that survive) the same least squares over what survives.
    """
    d, g_w = g_b.detach().double().cpu(), g_w.detach().double().cpu()
    if known is None:
        return g_w.T @ d / (d @ d), fc.weight.detach().double().cpu().T @ d
    return invert_pruned_fc(fc, g_w, d, *known)


def invert_pruned_fc(fc: nn.Linear, g_w: torch.Tensor, d: torch.Tensor, known_w: torch.Tensor,
                     known_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """invert_fc over the surviving entries: gW_ij = d_i a_j for each surviving (i, j).

    a_j = sum_i d_i gW_ij / sum_i d_i^2 over the rows i whose gW_ij and d_i both survive
    (0, the minimum norm, where none does); then each pruned d_i = sum_j gW_ij a_j /
    sum_j a_j^2 over its row's surviving j, the least squares of the same equations.
    """
    both = (known_w & known_b[:, None]).double()  # (10, n): equations with d_i known
    num, den = (both * d[:, None] * g_w).sum(0), (both * d[:, None] ** 2).sum(0)
    a = torch.where(den > 0, num / den.where(den > 0, 1.0), 0.0)
    row = known_w.double()
    num, den = (row * g_w * a).sum(1), (row * a ** 2).sum(1)
    d = torch.where(known_b, d, torch.where(den > 0, num / den.where(den > 0, 1.0), 0.0))
    return a, fc.weight.detach().double().cpu().T @ d


def patch_index(conv: nn.Conv2d, in_shape: tuple) -> torch.Tensor:
    """(C_in*k*k, P): flat input index under each entry of each patch, -1 on padding.

    Unfolding an image whose pixels hold their own index lets the framework do the
    convolution's index bookkeeping; rows are ordered like the weight's (c, i, j).
    """
    n = math.prod(in_shape)
    ids = torch.arange(1, n + 1, dtype=torch.float64).view(1, *in_shape)  # exact up to 2^53
    return F.unfold(ids, conv.kernel_size, padding=conv.padding, stride=conv.stride)[0].long() - 1


def conv_matrix(conv: nn.Conv2d, in_shape: tuple, idx: torch.Tensor | None = None) -> torch.Tensor:
    """M with M @ x.flatten() = conv2d(x, W).flatten() (no bias), float64.

    Row (o, p) holds W[o] at the input positions of patch p.
    """
    idx = patch_index(conv, in_shape) if idx is None else idx
    w = conv.weight.detach().double().cpu().flatten(1)  # (C_out, C_in*k*k)
    n_pos = idx.shape[1]
    rows = torch.arange(w.shape[0] * n_pos).view(-1, 1, n_pos)  # (C_out, 1, P)
    rows, cols = torch.broadcast_tensors(rows, idx[None])  # (C_out, Ckk, P)
    vals = w[:, :, None].expand_as(rows)
    return _scatter((w.shape[0] * n_pos, math.prod(in_shape)), rows, cols, vals)


def grad_matrix(conv: nn.Conv2d, in_shape: tuple, delta: torch.Tensor,
                idx: torch.Tensor | None = None) -> torch.Tensor:
    """G(delta) with G @ x.flatten() = dL/dW.flatten() for input x and dL/dz = delta.

    dL/dW[o, c, i, j] = sum_p delta[o, p] x[patch p at (c, i, j)], so row (o, c, i, j)
    holds delta[o, p] at the input position of entry (c, i, j) of patch p.
    """
    idx = patch_index(conv, in_shape) if idx is None else idx
    d = delta.detach().double().cpu().reshape(-1, idx.shape[1])  # (C_out, P); any number of rows (reduced_matrices)
    n_ckk = idx.shape[0]
    rows = torch.arange(d.shape[0] * n_ckk).view(-1, n_ckk, 1)  # (C_out, Ckk, 1)
    rows, cols = torch.broadcast_tensors(rows, idx[None])
    vals = d[:, None, :].expand_as(rows)
    return _scatter((d.shape[0] * n_ckk, math.prod(in_shape)), rows, cols, vals)


def _scatter(shape: tuple, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Dense matrix with the given entries; padding (col -1) dropped. No (row, col) repeats."""
    keep = cols >= 0
    out = torch.zeros(shape, dtype=torch.float64)
    out[rows[keep], cols[keep]] = vals[keep]
    return out


def solve_min_norm(U: torch.Tensor, V: torch.Tensor, equations: int | None = None) -> tuple[torch.Tensor, int]:
    """Minimum-norm least-squares solution of U x = V (float64) and the rank of U.

    The rank uses numpy's default tolerance: singular values below
    eps * max(m, n) * sigma_max count as zero, m the equations U stands for (its rows, or
    those of the system it reduces: LayerSystem.reduced_matrices). An unknown that appears
    in no equation (a zero column: pixels a strided convolution never reads) is 0 in the
    minimum-norm solution and changes no singular value, so it is left out of the
    factorizations.
    One Householder QR of the taller orientation then reduces the problem to a k x k
    triangular factor with U's singular values (k = min(m, n)); a certified full-rank
    factor is solved directly, any other by `min_norm_square`. Both give
    numpy.linalg.lstsq's rank and solution (tests) in a fraction of its time
    (docs/performance.md).
    """
    m, n = U.shape
    tol = torch.finfo(torch.float64).eps * max(m if equations is None else equations, n)
    used = (U != 0).any(0)
    if not used.all():
        x = U.new_zeros(n)
        x[used], rank = min_norm_solve(U[:, used], V, tol)
        return x, rank
    return min_norm_solve(U, V, tol)


def min_norm_solve(U: torch.Tensor, V: torch.Tensor, tol: float) -> tuple[torch.Tensor, int]:
    """solve_min_norm's solution and rank, with the tolerance given (relative to sigma_max)."""
    m, n = U.shape
    k, tall = min(m, n), m >= n
    a, tau = torch.geqrf(U if tall else U.T)  # U = QR, or U^T = QR
    R = a[:k].triu()
    # Full rank, the usual case for tall systems, is certified by ||R||_F ||R^-1||_F,
    # an upper bound on the condition number, with a 10x margin.
    R_inv = torch.linalg.solve_triangular(R, torch.eye(k, dtype=R.dtype), upper=True)
    full = torch.linalg.matrix_norm(R) * torch.linalg.matrix_norm(R_inv) * tol < 0.1
    if tall:  # ||Ux - V|| = ||Rx - Q^T V|| + const
        b = torch.ormqr(a, tau, V[:, None], transpose=True)[:k]
        y, rank = (R_inv @ b, k) if full else min_norm_square(R, b, tol, upper=True)
        return y[:, 0], rank
    # U = R^T Q^T, so x = Q y with y the minimum-norm solution of R^T y = V
    y, rank = (R_inv.T @ V[:, None], k) if full else min_norm_square(R.T, V[:, None], tol, upper=False)
    return torch.ormqr(a, tau, torch.cat([y, y.new_zeros(n - k, 1)]))[:, 0], rank


def min_norm_square(A: torch.Tensor, b: torch.Tensor, tol: float, upper: bool) -> tuple[torch.Tensor, int]:
    """Minimum-norm least squares for a square triangular A (`upper` or lower); its rank r
    counts sigma_i > tol * sigma_max.

    A QR of A's columns in an order P that puts a numerical null space last,
    A P = Q [T11 T12; 0 T22], certifies r whatever the order: sigma_{r+1} <= ||T22||_F and
    sigma_r >= 1 / ||T11^-1||_F, each with a 10x margin against the tolerance. The
    rank-r system [T11 T12] P^T y = (Q^T b)_r then has a minimum-norm solution through one
    more QR. The order comes from inverse iteration (null_space_last) and an unpivoted QR;
    failing its certificate, from a column-pivoted QR (LAPACK's geqp3, through scipy: it
    was 7x the time of the rest here, docs/performance.md); failing both, the SVD solve
    (gelsd). The systems have exact structural dependencies (C_out^2 rows of G are
    combinations of rows of M), so this path is common.
    """
    scale = torch.linalg.vector_norm(A, dim=0).max()  # the largest column norm, <= sigma_max
    order = null_space_last(A, upper, tol * scale)
    if order is not None:
        perm, r = order
        h, tau = torch.geqrf(A[:, perm])
        solved = certified_solution(h, tau, h.triu(), perm, r, b, tol, scale)
        if solved is not None:
            return solved
    (h, tau), T, perm = scipy.linalg.qr(A.numpy(), mode="raw", pivoting=True, check_finite=False)
    T, perm = torch.from_numpy(np.triu(T)), torch.from_numpy(perm).long()
    diag = T.diagonal().abs()  # diag[0]: the largest column norm
    solved = certified_solution(torch.from_numpy(h), torch.from_numpy(tau), T, perm, int((diag > tol * diag[0]).sum()),
                                b, tol, scale)
    if solved is not None:
        return solved
    sol = torch.linalg.lstsq(A, b, rcond=tol, driver="gelsd")  # the SVD solve
    return sol.solution, int(sol.rank)


def null_space_last(A: torch.Tensor, upper: bool, small: float) -> tuple[torch.Tensor, int] | None:
    """A column order of the triangular A with its numerical null space last, and the rank
    that leaves; None where none is found.

    One step of inverse iteration, X = (A^T A)^-1 Omega by two triangular solves, scales
    each right singular direction of A by 1/sigma^2, so the directions A nearly annihilates
    lead X's singular vectors; X's singular values count those with sigma <= small (an
    estimate: the certificate decides). They span the null space N (m x d); d columns at
    which N's rows are independent (a pivoted QR of the small N^T) complete the others to
    rank m - d, so they go last. The probe widens until it holds more directions than the
    null space.
    """
    m = A.shape[0]
    width = min(m, 32 + 2 * int((A.diagonal().abs() <= small).sum()))
    generator = torch.Generator().manual_seed(0)
    while True:
        omega = torch.randn(m, width, dtype=A.dtype, generator=generator)
        x = torch.linalg.solve_triangular(A, torch.linalg.solve_triangular(A.T, omega, upper=not upper), upper=upper)
        if not torch.isfinite(x).all():  # an exact zero on the diagonal: the pivoted QR decides
            return None
        q, s, _ = torch.linalg.svd(x, full_matrices=False)
        d = int((s * small**2 >= width**0.5).sum())  # s_i ~ |Omega's part| / sigma_i^2, that part ~ width^0.5
        if d < width or width == m:
            break
        width = min(m, 2 * width)
    if d in (0, m):
        return None
    last = torch.from_numpy(scipy.linalg.qr(q[:, :d].T.numpy(), mode="r", pivoting=True, check_finite=False)[1][:d])
    first = torch.ones(m, dtype=torch.bool)
    first[last] = False
    return torch.cat([first.nonzero()[:, 0], last.long()]), m - d


def certified_solution(h: torch.Tensor, tau: torch.Tensor, T: torch.Tensor, perm: torch.Tensor, r: int,
                       b: torch.Tensor, tol: float, scale: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """min_norm_square's solution from a QR of A's permuted columns (Householder h, tau; T
    its upper triangle), where rank r is certified against `scale` <= sigma_max; else None."""
    T11_inv = torch.linalg.solve_triangular(T[:r, :r], torch.eye(r, dtype=T.dtype), upper=True)
    if not (torch.linalg.matrix_norm(T[r:, r:]) <= 0.1 * tol * scale
            and 1 / torch.linalg.matrix_norm(T11_inv) >= 10 * tol * torch.linalg.matrix_norm(T)):
        return None
    c = torch.ormqr(h, tau, b, transpose=True)
    h3, tau3 = torch.geqrf(T[:r].T)  # [T11 T12]^T = Q3 R3, so z = Q3 R3^-T c_r
    w = torch.linalg.solve_triangular(h3[:r].triu().T, c[:r], upper=False)
    z = torch.ormqr(h3, tau3, torch.cat([w, w.new_zeros(len(perm) - r, 1)]))
    return z.new_empty(z.shape).index_copy_(0, perm, z), r


@dataclass
class LayerSystem:
    """Both sets of linear equations on the input x of convolution `layer` (step 2 above)."""

    layer: int
    z_minus_b: torch.Tensor  # what M x must equal: z_l - b_l, shape (1, C_out, H, W)
    delta: torch.Tensor  # dL/dz_l, same shape
    g_w: torch.Tensor  # the shared weight gradient of the layer: what G(delta) x must equal
    known: torch.Tensor | None = None  # under pruning, gW's surviving entries: G's rows that are equations

    def to(self, dtype: torch.dtype, device: str | torch.device) -> LayerSystem:
        known = None if self.known is None else self.known.to(device)
        return LayerSystem(self.layer, *(t.to(dtype=dtype, device=device) for t in
                                         (self.z_minus_b, self.delta, self.g_w)), known)

    def matrices(self, model: Net) -> tuple[torch.Tensor, torch.Tensor]:
        """U = [M; G] and V = [z - b; gW], dense float64 on the CPU; under pruning, G and
        gW keep the surviving rows only (a pruned entry is no equation, not "0 = G x")."""
        conv, shape = model.layers[self.layer], model.shapes[self.layer]
        idx = patch_index(conv, shape)
        G, g_w = self.gradient_equations(conv, shape, idx, reduce=False)
        return torch.cat([conv_matrix(conv, shape, idx), G]), torch.cat([self.z_minus_b.flatten().double().cpu(), g_w])

    def reduced_matrices(self, model: Net, forward: ForwardMap) -> tuple[torch.Tensor, torch.Tensor]:
        """U and V of `matrices` times an orthogonal matrix, with fewer rows where the
        structure allows (`equations` counts those U stands for). The singular values and
        the least-squares solutions are U's (||U x - V||^2 changes by a constant).

        M, fixed by the weights, becomes its R factor where it has more rows than columns
        (M = Q_M R_M, factored once per weights in a process: `forward`, from forward_map),
        and z - b its part Q_M^T (z - b); G as gradient_equations reduces it.
        """
        conv, shape = model.layers[self.layer], model.shapes[self.layer]
        M, v_m = forward.M, self.z_minus_b.flatten().double().cpu()
        if forward.qr is not None:
            a, tau = forward.qr
            M, v_m = a[:a.shape[1]].triu(), torch.ormqr(a, tau, v_m[:, None], transpose=True)[:a.shape[1], 0]
        G, g_w = self.gradient_equations(conv, shape, forward.idx, reduce=True)
        return torch.cat([M, G]), torch.cat([v_m, g_w])

    def gradient_equations(self, conv: nn.Conv2d, shape: tuple, idx: torch.Tensor,
                           reduce: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """G(delta) and gW, flattened; under pruning, the surviving rows only. With `reduce`,
        fewer rows where delta (C_out x P) has more rows than columns: G(delta) x is
        delta cols(x)^T, so with delta = Q R, Q^T G(delta) = G(R) and gW becomes Q^T gW
        (C_out C_in k k rows become P C_in k k). Pruning's surviving rows break that structure."""
        delta, g_w = self.delta.double().cpu().reshape(conv.out_channels, -1), self.g_w.double().cpu().flatten(1)
        if self.known is not None:
            rows = self.known.flatten().cpu()
            return grad_matrix(conv, shape, delta, idx)[rows], g_w.flatten()[rows]
        if reduce and delta.shape[0] > delta.shape[1]:
            q, delta = torch.linalg.qr(delta)
            g_w = q.T @ g_w
        return grad_matrix(conv, shape, delta, idx), g_w.flatten()

    def equations(self) -> int:
        """How many equations the system holds: M's rows and G's (under pruning, those that survive)."""
        return self.z_minus_b.numel() + (self.g_w.numel() if self.known is None else int(self.known.sum()))

    def forward_and_residual(self, model: Net, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's pre-activation z(x) and ||U x - V||^2, U never formed.

        One im2col of x serves the forward map (W cols) and the weight-gradient map
        (delta cols^T); the hybrid passes z on to the layers above, so the convolution
        and its gradients are computed once per step.
        """
        conv = model.layers[self.layer]
        cols = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)[0]  # (C_in k k, P)
        z = (conv.weight.flatten(1) @ cols).view_as(self.z_minus_b)
        weight_grad = self.delta.reshape(conv.out_channels, -1) @ cols.T  # (C_out, C_in*k*k)
        misfit = weight_grad - self.g_w.flatten(1)
        if self.known is not None:  # the pruned entries are no equations
            misfit = misfit * self.known.flatten(1)
        residual = (z - self.z_minus_b).square().sum() + misfit.square().sum()
        return (z if conv.bias is None else z + conv.bias.view(1, -1, 1, 1)), residual


@dataclass(frozen=True)
class ForwardMap:
    """What a convolution's systems take from its weights alone: the patch index, M, M's
    Householder QR (torch.geqrf) where M has more rows than columns, and M^T M where the
    systems have at least as many equations as unknowns (gram_solution)."""

    idx: torch.Tensor
    M: torch.Tensor
    qr: tuple[torch.Tensor, torch.Tensor] | None
    gram: torch.Tensor | None = None


FORWARD_MAPS: dict[tuple, ForwardMap] = {}  # the latest, by weights and input shape, oldest first
FORWARD_MAPS_BYTES = 2**31  # kept while they fit (a zoo model's layers: at most about 0.6 GB)


def forward_map(conv: nn.Conv2d, shape: tuple) -> ForwardMap:
    """The convolution's ForwardMap, built once per weights and input shape in a process:
    the images of a model in a worker and the attacks of a cell share it (#33)."""
    key = (digest(conv.weight), conv.stride, conv.padding, tuple(shape))
    if key not in FORWARD_MAPS:
        idx = patch_index(conv, shape)
        M = conv_matrix(conv, shape, idx)
        tall = M.shape[0] + conv.weight.numel() >= M.shape[1]  # [M; G] has as many rows as columns
        FORWARD_MAPS[key] = ForwardMap(idx, M, torch.geqrf(M) if M.shape[0] > M.shape[1] else None,
                                       M.T @ M if tall else None)
        while len(FORWARD_MAPS) > 1 and sum(map(map_bytes, FORWARD_MAPS.values())) > FORWARD_MAPS_BYTES:
            del FORWARD_MAPS[next(iter(FORWARD_MAPS))]
    return FORWARD_MAPS[key]


def map_bytes(forward: ForwardMap) -> int:
    tensors = [forward.idx, forward.M, *(forward.qr or ()), *([] if forward.gram is None else [forward.gram])]
    return sum(t.numel() * t.element_size() for t in tensors)


def layer_system(model: Net, layer: int, a_hat: torch.Tensor, dl_da: torch.Tensor,
                 grads: list[torch.Tensor], known: list[torch.Tensor] | None = None) -> LayerSystem:
    """From the estimate of a layer's output and dL/d(output): z, delta and the equations
    (under pruning, those of gW's entries that `known`, per parameter, says survive)."""
    conv, act = model.layers[layer], model.acts[layer]
    c, h, w = model.shapes[layer + 1]
    z = inverse_activation(act, a_hat.reshape(1, c, h, w))
    delta = dl_da.reshape(1, c, h, w) * activation_derivative(act, z)
    if conv.bias is not None:  # the forward constraints hold for z - b
        z = z - conv.bias.detach().double().cpu().view(1, -1, 1, 1)
    return LayerSystem(layer, z, delta, by_layer(model, grads)[layer][0].double(),
                       None if known is None else by_layer(model, known)[layer][0])


Where = Callable[[list[int]], bool]  # the deficiencies of layers l, l+1, ... -> correct layer l?
# (the clients' indices, their systems, their x_hats) -> the x each passes down (hybrids)
Corrections = Callable[[list[int], list[LayerSystem], list[torch.Tensor]], list[torch.Tensor]]


def recursive_reconstruction(model: Net, grads: list[torch.Tensor], verbose: bool = False,
                             known: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[int]]:
    """R-GAP's recursion (steps 1 and 2 above), from the fc layer down to the image.

    Returns the image estimate (1, C, H, W) and each layer's rank deficiency but the
    last's (layer 0 first; a linear layer's is 0). Under pruning, `known` (per parameter,
    the surviving entries) drops the pruned equations.
    """
    return recursive_reconstructions([model], [grads], verbose=verbose, known=[known])[0]


def recursive_reconstructions(models: list[Net], grads: list[list[torch.Tensor]], correct: Corrections | None = None,
                              verbose: bool = False, where: Where | None = None,
                              known: list[list[torch.Tensor] | None] | None = None,
                              steps: list[SharedSteps | None] | None = None) -> list[tuple[torch.Tensor, list[int]]]:
    """recursive_reconstruction of several clients' gradients (models of one architecture)
    in step, layer by layer: at each layer every client's solve, one after another, within
    its own SharedSteps (`steps`; None: the current ones). `correct` (the hybrid's gradient
    matching) may then replace the least-squares solutions before they are passed down, in
    one call for the clients that make a correction there: correct(their indices, systems,
    x_hats). A client corrects at every layer, or only at the layers l where
    `where(deficiency[l:])` holds of its ranks (the recursion runs from the top, so layer
    l's and the deficiencies above it are known by then)."""
    n, n_layers, top = len(models), len(models[0].layers), models[0].first_linear
    grads = [[g.detach().double().cpu() for g in client] for client in grads]  # in float64 on the CPU
    known = [None if k is None else [t.cpu() for t in k] for k in (known or [None] * n)]
    steps = steps or [None] * n
    a_hat, dl_da = map(list, zip(*(invert_fc(model.layers[top], *by_layer(model, g)[top],
                                             None if k is None else tuple(by_layer(model, k)[top]))
                                   for model, g, k in zip(models, grads, known))))
    # the first linear layer's input, from its own gradient (with several, those above it
    # are determined each by its own gradient too: deficiency 0, nothing to solve)
    deficiency = [[0] * (n_layers - 1) for _ in models]
    for layer in progress(range(top - 1, -1, -1), "layers"):
        systems = []
        for i, model in enumerate(models):
            with sharing(steps[i]):
                inputs = ("solve", layer, a_hat[i], dl_da[i], known[i] is not None)
                system, x_hat, rank, dl_da[i], size = shared_step(inputs, functools.partial(
                    solve_layer, model, layer, a_hat[i], dl_da[i], grads[i], known[i]))
            systems.append(system)
            deficiency[i][layer] = rank - size[1]
            a_hat[i] = x_hat.view(1, *model.shapes[layer])
            if verbose:
                say(f"  layer {layer}: {size[0]} equations, {size[1]} unknowns, rank {rank}, "
                    f"deficiency {deficiency[i][layer]}")
        todo = [i for i in range(n) if correct is not None and (where is None or where(deficiency[i][layer:]))]
        if todo:
            for i, x in zip(todo, correct(todo, [systems[i] for i in todo], [a_hat[i] for i in todo])):
                a_hat[i] = x.double().cpu()
    return [(a.float(), d) for a, d in zip(a_hat, deficiency)]


def solve_layer(model: Net, layer: int, a_hat: torch.Tensor, dl_da: torch.Tensor, grads: list[torch.Tensor],
                known: list[torch.Tensor] | None) -> tuple[LayerSystem, torch.Tensor, int, torch.Tensor, tuple]:
    """One step of the recursion at convolution `layer`: its system, the minimum-norm
    least-squares solution and U's rank, dL/da of the layer below (M^T delta), and U's shape
    (its equations, however few rows the reduced system has, and its unknowns)."""
    system = layer_system(model, layer, a_hat, dl_da, grads, known)
    conv, shape = model.layers[layer], model.shapes[layer]
    forward = forward_map(conv, shape)
    equations, unknowns = system.equations(), math.prod(shape)
    solved = gram_solution(system, conv, forward, equations)
    if solved is None:
        x_hat, rank = solve_min_norm(*system.reduced_matrices(model, forward), equations)
    else:
        x_hat, rank = solved
    return system, x_hat, rank, forward.M.T @ system.delta.flatten(), (equations, unknowns)


def gram_solution(system: LayerSystem, conv: nn.Conv2d, forward: ForwardMap,
                  equations: int) -> tuple[torch.Tensor, int] | None:
    """solve_min_norm's answer for a system with more equations than unknowns that its
    normal equations certify full rank, or None (the QR decides).

    U^T U = M^T M + G^T G: M^T M depends on the weights alone (forward.gram), and G^T G is
    the sum over the patch entries c of delta^T delta (P x P) scattered to the pixels
    that entry reads, so neither U nor its QR is formed (a tall QR costs 2 m n^2 flops,
    this about C_in k^2 P^2 scattered entries and two Choleskys' n^3 / 3).

    Full rank is certified as rigorously as min_norm_solve's, by a Cholesky of the
    computed Gram matrix shifted down by s = (10 tol)^2 ||U||_F^2 + 2 d, with
    d = gamma_{m+n+1} ||U||_F^2 bounding both the Gram matrix's rounding and the
    factorization's backward error (Higham, Accuracy and Stability, Thms 3.5 and 10.3):
    where it succeeds, lambda_min(U^T U) >= s - 2 d, so sigma_min(U) >= 10 tol ||U||_F >=
    10 tol sigma_max, and numpy's rank is n too (Rump's test for positive definiteness).
    One step of refinement against U's residual brings the solution to the QR's accuracy
    (tests: numpy's to 1e-12; the subset's layers: the QR's to 5e-14). The subset's tall
    systems have condition numbers below 3000 (docs/performance.md). Not under pruning (its
    surviving rows break the structure).
    """
    idx, n = forward.idx, forward.M.shape[1]
    if (forward.gram is None or system.known is not None or equations < n
            or idx.numel() * idx.shape[1] > equations * n * n / 128):  # the scatter would cost more than a QR
        return None
    padded = torch.where(idx >= 0, idx, n)  # padding reads a pixel n that is dropped
    delta = system.delta.double().cpu().reshape(conv.out_channels, -1)  # (C_out, P)
    A = forward.gram.new_zeros(n + 1, n + 1)
    D = delta.T @ delta
    for entry in padded:  # G^T G, one patch entry (c, i, j) at a time: its P pixels, delta^T delta among them
        A.index_put_((entry[:, None], entry[None, :]), D, accumulate=True)
    A = A[:n, :n] + forward.gram
    used = A.diagonal() > 0  # an unknown in no equation is 0 in the minimum-norm solution
    A = A[used][:, used]
    eps, k = torch.finfo(torch.float64).eps, equations + n + 1
    tol = eps * max(equations, n)
    frobenius_sq = A.diagonal().sum()  # ||U||_F^2
    shift = ((10 * tol) ** 2 + 2 * 1.01 * k * eps / (1 - k * eps)) * frobenius_sq
    if torch.linalg.cholesky_ex(A - shift * torch.eye(len(A), dtype=A.dtype)).info != 0:
        return None
    L = torch.linalg.cholesky(A)
    g_w = system.g_w.double().cpu().reshape(conv.out_channels, -1)
    z = system.z_minus_b.flatten().double().cpu()

    def normal_side(r_m: torch.Tensor, r_g: torch.Tensor) -> torch.Tensor:  # U^T [r_m; r_g], r_g as gW
        out = forward.M.T @ r_m
        return out + out.new_zeros(n + 1).index_add_(0, padded.flatten(), (r_g.T @ delta).flatten())[:n]

    def solve(b: torch.Tensor) -> torch.Tensor:
        x = b.new_zeros(n)
        x[used] = torch.cholesky_solve(b[used, None], L)[:, 0]
        return x
    x = solve(normal_side(z, g_w))
    cols = torch.cat([x, x.new_zeros(1)])[padded]  # (C_in k k, P)
    x = x + solve(normal_side(z - forward.M @ x, g_w - delta @ cols.T))  # one step of refinement
    return x, int(used.sum())


# -- Work shared by the attacks of one cell ------------------------------------------------
# R-GAP, the hybrid and hybrid_free run one recursion on one shared gradient. The top
# layer's step is the same for all three; so is every step hybrid_free leaves to R-GAP until
# its first correction, and every correction it makes from the input the hybrid corrected.
# Each step is a function of its inputs alone (the model and the gradient, fixed within a
# cell; the layer and the estimate passed down; a correction also the label and the
# method's settings): a step met again within a cell is taken from the first time, not run
# twice, and its numbers are those of running it again, to the bit.


class SharedSteps:
    """The steps of one cell's attacks, by their inputs: each step's value; `computed` counts
    the steps run, `taken` those taken again."""

    def __init__(self) -> None:
        self.steps: dict[tuple, object] = {}
        self.computed = self.taken = 0


SHARED: contextvars.ContextVar[SharedSteps | None] = contextvars.ContextVar("shared_steps", default=None)


def digest(value: object) -> object:
    """A step's input as a key: a tensor by its bytes (shape and dtype too), anything else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    t = value.detach().cpu().contiguous()
    return hashlib.sha1(f"{tuple(t.shape)}{t.dtype}".encode() + t.numpy().tobytes()).hexdigest()


def shared_step(inputs: tuple, compute: Callable[[], object]) -> object:
    """`compute()`, or, within a cell, its value the first time these `inputs` were met (the
    tensors among them hashed only within a cell)."""
    key = step_key(inputs)
    value = taken_step(key)
    return kept_step(key, compute()) if value is MISSING else value


MISSING = object()  # a step not met before


def step_key(inputs: tuple) -> tuple | None:
    """A step's key within the current cell's SharedSteps; None outside a cell."""
    return None if SHARED.get() is None else tuple(digest(v) for v in inputs)


def taken_step(key: tuple | None) -> object:
    """The step's value from the first time it was met, or MISSING."""
    shared = SHARED.get()
    if key is None or key not in shared.steps:
        return MISSING
    shared.taken += 1
    return shared.steps[key]


def kept_step(key: tuple | None, value: object) -> object:
    """`value`, kept as the step's within the current cell."""
    if key is not None:
        SHARED.get().computed += 1
        SHARED.get().steps[key] = value
    return value


@contextlib.contextmanager
def sharing(steps: SharedSteps | None) -> Iterator[None]:
    """Within it, the steps met are `steps`' (None: the current cell's, whatever they are).
    Clients attacked together (recursive_reconstructions) each keep their own."""
    if steps is None:
        yield
        return
    token = SHARED.set(steps)
    try:
        yield
    finally:
        SHARED.reset(token)


def security_index(deficiency: list[int]) -> int:
    """The paper's security index: sum_l round(r_l (L-1-l) / (L-1)) over the convolutions
    l = 0..L-2 (the published code prints it as the "COPA index").

    Layers nearer the input weigh more. 0: every layer is determined and the image is
    recovered exactly, up to conditioning; the more negative, the more of it is free.
    A property of the architecture, the weights and the input; it needs no attack.
    """
    n = len(deficiency)  # = L - 1
    return int(sum(round(r * (n - l) / n) for l, r in enumerate(deficiency)))


def worst_layer_fraction(deficiency: list[int], unknowns: list[int]) -> float:
    """Ours, beside the paper's index: min_l r_l / n_l, the largest fraction of any one
    convolution's n_l unknowns that its system leaves free (r_l = rank - n_l <= 0). In
    [-1, 0]: 0 exactly where the paper's index is 0 before rounding (every layer
    determined), -1 where some layer's equations determine nothing. How it was chosen, and
    the test it was fixed before: docs/study.md."""
    return min(r / n for r, n in zip(deficiency, unknowns))


def layer_unknowns(model: str, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> list[int]:
    """n_l: each layer's unknowns but the last's, the size of its input, on inputs of `shape`.
    A module's are read from its file: only in a run whose command names it (the record
    states them, as `unknowns`, for every reader after)."""
    if is_model_file(model):
        return list(module_layout(model, shape)[1])
    return [math.prod(s) for s in layer_shapes(architecture(model, shape), shape=shape)[:-1]]


def indices_of(deficiency: list[int] | None, unknowns: list[int] | None) -> dict[str, float | None]:
    """Both indices of a (model, image) from its rank deficiencies and each layer's
    unknowns (None where either is unknown)."""
    if deficiency is None:
        return dict.fromkeys(report.INDICES)
    return {"security_index": security_index(deficiency),
            "worst_layer_fraction": None if unknowns is None else worst_layer_fraction(deficiency, unknowns)}


def rank_deficiency(model: Net, grads: list[torch.Tensor], known: list[torch.Tensor] | None = None) -> list[int]:
    """Each convolution's rank deficiency (layer 0 first), from R-GAP's recursion alone;
    with `known`, of the equations that survive pruning."""
    return recursive_reconstruction(model, grads, known=known)[1]



# =============================================================================
# Attacks: one signature (model, shared gradient, label, settings), one result type
# =============================================================================


@dataclass
class AttackResult:
    x: torch.Tensor  # the reconstruction in model space, (1, 3, 32, 32)
    label: int  # the label the attack used or found
    info: dict = field(default_factory=dict)  # attack-specific numbers for results.json


# Attacks take the model, the shared gradient and a label, never the image (the threat model).
AttackFunction = Callable[[Net, list[torch.Tensor], int, AttackSettings], AttackResult]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of (1, C, H, W) as the published code had it: the mean absolute
    difference of horizontal neighbours plus that of vertical ones."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def cosine_distance(dummy: list[torch.Tensor], shared: list[torch.Tensor]) -> torch.Tensor:
    """sum_p 1 - cos(dummy_p, shared_p), the tensors flattened (Geiping et al. 2020)."""
    return sum(1 - F.cosine_similarity(d.flatten(), g.flatten(), dim=0, eps=1e-10)
               for d, g in zip(dummy, shared))


def squared_distance(dummy: list[torch.Tensor], shared: list[torch.Tensor]) -> torch.Tensor:
    """sum_p ||dummy_p - shared_p||^2 (Zhu et al. 2019)."""
    return sum((d - g).square().sum() for d, g in zip(dummy, shared))


def dummy_gradient(model: Net, output: torch.Tensor, target: torch.Tensor, start: int = 0) -> list[torch.Tensor]:
    """Gradient of CE(output, target) w.r.t. the parameters of layers start..L-1, kept
    differentiable so that a distance to the shared gradient can be minimised."""
    params = [p for layer in model.layers[start:] for p in layer.parameters()]
    return list(torch.autograd.grad(F.cross_entropy(output, target), params, create_graph=True))


def objective_info(first: list[float], last: float) -> dict:
    """The attack's own objective before and after: results.json reports both (null
    where it left the finite numbers)."""
    return {"objective_start": inf_to_none(first[0] if first else last), "objective_end": inf_to_none(last)}


def best_start(start: Callable[[], AttackResult], restarts: int) -> AttackResult:
    """`restarts` runs of an attack from random images, one after another from the
    attack's seed (the first is the paper's single run), keeping the one whose own final
    objective is lowest: an attacker can compute that without the image (breaching's
    `restarts`). DLG's L-BFGS is chaotic (docs/attacks.md), so one start is a lottery ticket.
    A start whose objective left the finite numbers ranks last."""
    starts = [start() for _ in range(restarts)]
    if restarts == 1:
        return starts[0]
    ends = [math.inf if s.info["objective_end"] is None else s.info["objective_end"] for s in starts]
    best = int(np.argmin(ends))
    starts[best].info |= {"best_start": best, "starts": [{"objective_start": s.info["objective_start"],
                                                          "objective_end": s.info["objective_end"],
                                                          "label": s.label} for s in starts]}
    return starts[best]


# =============================================================================
# R-GAP (Zhu and Blaschko, ICLR 2021): the recursion with least squares alone
# =============================================================================


def known_entries(grads: list[torch.Tensor], settings: AttackSettings) -> list[torch.Tensor] | None:
    """The entries of the shared gradient that are equations for R-GAP and the hybrid:
    all (None), or under pruning the nonzeros alone."""
    return surviving(grads) if settings.zeros_are_missing else None


def attack_rgap(model: Net, grads: list[torch.Tensor], label: int, settings: AttackSettings) -> AttackResult:
    x, deficiency = recursive_reconstruction(model, grads, verbose=settings.verbose,
                                             known=known_entries(grads, settings))
    return AttackResult(x.to(grads[0].device), label,
                        {"rank_deficiency": deficiency, "security_index": security_index(deficiency)})


# =============================================================================
# The hybrid attack (the paper): least squares, then gradient matching, at every convolution
# =============================================================================
#
# R-GAP's recursion, but each layer's least-squares solution x_hat is corrected before it
# is passed down: Adam (lr 1e-3, PyTorch's defaults, on a float32 copy), from x_hat, on
#
#     J(x) = w_cos sum_p (1 - cos(grad_p CE(f_{l:}(x), y), g_p)) + w_tv TV(x) + w_sq ||Ux - V||^2
#
# f_{l:} is the network from layer l up; p ranges over the parameters of layers l..L-1,
# g_p is their shared gradient; y is the label every attack uses. The weights and step
# counts per layer are hybrid_schedule's.


def hybrid_schedule(layer: int, settings: AttackSettings) -> tuple[float, float, float, int]:
    """(w_cos, w_tv, w_sq, Adam steps) for a layer, as the published code set them:

        layer            w_cos  w_tv  w_sq  Adam steps
        0 (the image)      1     1    0.05  N0 (hybrid_iters_first; paper 10000)
        1                  1     1    0.1   4 N (hybrid_iters N; paper 2000)
        2 and above       10     0.1  1     N // 2
    """
    if layer == 0:
        return 1.0, 1.0, 0.05, settings.hybrid_iters_first
    if layer == 1:
        return 1.0, 1.0, 0.1, 4 * settings.hybrid_iters
    return 10.0, 0.1, 1.0, settings.hybrid_iters // 2


def hybrid_objective(model: Net, system: LayerSystem, x: torch.Tensor, shared: list[torch.Tensor],
                     target: torch.Tensor, weights: tuple[float, float, float],
                     known: list[torch.Tensor] | None = None, functional: bool = False) -> torch.Tensor:
    """The paper's J(x) at layer l = system.layer. `shared` is the shared gradient of
    layers l..L-1 (gradients_from), `target` the label as a (1,) tensor, and `system`
    holds tensors of x's dtype and device. Under pruning the cosine compares the surviving
    entries alone (`known`, as `shared`; the residual drops the pruned ones itself).

    The dummy gradient grad_p CE(f_{l:}(x), y) is taken by autograd's double backward, with
    layer l's forward shared between the residual ||Ux - V||^2 and f_{l:}(x); or, where
    `functional`, through torch.func (functional_call and a nested grad), the form
    torch.compile can trace (Dynamo cannot trace a double backward). The two are equal in
    value; the functional form runs layer l's convolution a second time, inside
    functional_call, as the weight's gradient must be taken through it.
    """
    w_cos, w_tv, w_sq = weights
    z, residual = system.forward_and_residual(model, x)
    if functional:
        dummy = functional_dummy_gradient(model, x, target, system.layer)
    else:
        output = model(model.acts[system.layer](z), system.layer + 1)  # f_{l:}(x)
        dummy = dummy_gradient(model, output, target, system.layer)  # p in layers l..L-1
    if known is not None:
        dummy = [d * k for d, k in zip(dummy, known)]
    return w_cos * cosine_distance(dummy, shared) + w_tv * total_variation(x) + w_sq * residual


def functional_dummy_gradient(model: Net, x: torch.Tensor, target: torch.Tensor, start: int) -> list[torch.Tensor]:
    """dummy_gradient(model, model(x, start), target, start) through torch.func."""
    params = {f"layers.{i}.{name}": p.detach() for i in range(start, len(model.layers))
              for name, p in model.layers[i].named_parameters()}
    loss = lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x, start)), target)  # noqa: E731
    return list(torch.func.grad(loss)(params).values())


GradAndValue = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (dJ/dx, J)


def hybrid_grad_and_value(model: Net, system: LayerSystem, shared: list[torch.Tensor], label: int,
                          weights: tuple[float, float, float], compile: bool,
                          known: list[torch.Tensor] | None = None) -> GradAndValue:
    """x -> (dJ/dx, J): a double backward through autograd, or with --compile the
    torch.func form of J, traced and compiled once per layer shape (compiled_grad_and_value)."""
    target = torch.tensor([label], device=system.z_minus_b.device)
    if compile:
        return lambda x: compiled_grad_and_value()(model, system, x.detach(), shared, target, weights, known)

    def eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        objective = hybrid_objective(model, system, x, shared, target, weights, known)
        return torch.autograd.grad(objective, [x])[0], objective
    return eager


def gradient_matching(model: Net, system: LayerSystem, x_hat: torch.Tensor, *, grads: list[torch.Tensor],
                      label: int, settings: AttackSettings) -> torch.Tensor:
    """The hybrid's correction of convolution l's least-squares solution x_hat: Adam
    (lr 1e-3, PyTorch's defaults) from a float32 copy of x_hat on J(x), with the weights
    and the number of steps of hybrid_schedule for layer l. One image through
    hybrid_objective: the form --compile compiles; without it, gradient_matching_together
    runs every image through batched_objective."""
    device = grads[0].device
    *weights, steps = hybrid_schedule(system.layer, settings)
    system = system.to(torch.float32, device)
    shared = gradients_from(model, grads, system.layer)  # g_p, p in layers l..L-1
    known = known_entries(shared, settings)
    grad_and_value = hybrid_grad_and_value(model, system, shared, label, tuple(weights), settings.compile, known)
    return adam(x_hat.float().to(device), grad_and_value, steps, f"hybrid layer {system.layer}")


def adam(x: torch.Tensor, grad_and_value: GradAndValue, steps: int, what: str) -> torch.Tensor:
    """`steps` of Adam (lr 1e-3, PyTorch's defaults) from x on the objective whose
    gradient and value (one per image of a batch) grad_and_value gives."""
    x = x.requires_grad_()
    opt = torch.optim.Adam([x], lr=1e-3)
    bar = progress(steps, what)
    for step in bar:
        x.grad, objective = grad_and_value(x)
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(J=f"{objective.mean().item():.4g}", refresh=False)
    return x.detach()


def gradient_matching_together(models: list[Net], systems: list[LayerSystem], x_hats: list[torch.Tensor], *,
                               grads: list[list[torch.Tensor]], labels: list[int],
                               settings: AttackSettings) -> list[torch.Tensor]:
    """gradient_matching of several clients' solutions at one layer (models of one
    architecture, at least one) as one batch, or with --compile one at a time.

    The batch minimises the sum over clients of each one's J with one Adam over the
    stacked x. Adam is elementwise and each J reads its own x alone, so each client
    follows its own trajectory, and batched_objective computes each client's J and dJ/dx
    to the bit as it does for that client alone: a client's numbers do not depend on the
    batch it was in (tests). They equal gradient_matching's to float32 rounding. On a CPU
    batching halves a step's per-operation overhead per image (docs/performance.md); on a
    GPU it fills the device.
    """
    if settings.compile:  # Dynamo traces no double backward: --compile matches one at a time
        return [gradient_matching(model, system, x_hat, grads=g, label=label, settings=settings)
                for model, system, x_hat, g, label in zip(models, systems, x_hats, grads, labels)]
    device, layer = grads[0][0].device, systems[0].layer
    *weights, steps = hybrid_schedule(layer, settings)
    shared = [gradients_from(model, g, layer) for model, g in zip(models, grads)]  # g_p, p in layers l..L-1
    known = [known_entries(s, settings) for s in shared]
    batch = Batch.of(models, [system.to(torch.float32, device) for system in systems],
                     shared, None if known[0] is None else known, torch.tensor(labels, device=device))

    def grad_and_value(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        objective = batched_objective(models[0], batch, x, tuple(weights))
        return torch.autograd.grad(objective.sum(), [x])[0], objective
    x = torch.cat([x_hat.float().to(device) for x_hat in x_hats])
    what = f"hybrid layer {layer}" + (f", {len(models)} images" if len(models) > 1 else "")
    return list(adam(x, grad_and_value, steps, what).split(1))


class Batch(NamedTuple):
    """What batched_objective reads of B clients at convolution `layer`, each stacked on a
    first axis of B: their systems, the parameters of layers l..L-1 (per client, so that
    each one's dummy gradient is its own), their shared gradients g_p and labels."""

    layer: int
    z_minus_b: torch.Tensor  # (B, C_out, P)
    delta: torch.Tensor  # (B, C_out, P)
    g_w: torch.Tensor  # (B, C_out, C_in k k)
    known_w: torch.Tensor | None  # (B, C_out, C_in k k): under pruning, gW's surviving entries
    params: list[torch.Tensor]  # each (B, *shape), requiring grad
    shared: list[torch.Tensor]  # each (B, size): the shared gradients' directions, g_p / ||g_p||
    known: list[torch.Tensor] | None  # under pruning, as shared
    target: torch.Tensor  # (B,)

    @staticmethod
    def of(models: list[Net], systems: list[LayerSystem], shared: list[list[torch.Tensor]],
           known: list[list[torch.Tensor]] | None, target: torch.Tensor) -> Batch:
        layer, out = systems[0].layer, models[0].layers[systems[0].layer].out_channels
        stack = lambda tensors, *shape: torch.stack([t.reshape(*shape) for t in tensors])  # noqa: E731
        params = [torch.stack(p).detach().requires_grad_() for p in
                  zip(*([p for m in model.layers[layer:] for p in m.parameters()] for model in models))]
        return Batch(layer, stack([s.z_minus_b for s in systems], out, -1), stack([s.delta for s in systems], out, -1),
                     stack([s.g_w for s in systems], out, -1),
                     None if systems[0].known is None else stack([s.known for s in systems], out, -1),
                     params, [direction(torch.stack(p).flatten(1)) for p in zip(*shared)],
                     None if known is None else [torch.stack(k) for k in zip(*known)], target)


def direction(g: torch.Tensor) -> torch.Tensor:
    """Each row of g over its norm (a zero row stays zero, as in F.cosine_similarity's eps)."""
    return g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-10)


def batched_objective(model: Net, batch: Batch, x: torch.Tensor, weights: tuple[float, float, float]) -> torch.Tensor:
    """Each client's J (hybrid_objective) at x (B, C, H, W): a (B,) tensor. The layers
    l..L-1 run as unfold and batched matrix products with each client's own parameters,
    so that autograd gives per-client dummy gradients (a functorch vmap over J's
    functional form measured 1.7x slower on the CPU: docs/performance.md)."""
    w_cos, w_tv, w_sq = weights
    a, k, n = x, 0, len(x)
    for i in range(batch.layer, len(model.layers)):
        layer, act = model.layers[i], model.acts[i]
        if isinstance(layer, nn.Linear):
            z = torch.linalg.vecdot(batch.params[k], a.flatten(1)[:, None, :])  # not bmm: (B, K, 1) rounds by B
        else:
            cols = F.unfold(a, layer.kernel_size, padding=layer.padding, stride=layer.stride)  # (B, C_in k k, P)
            z = torch.bmm(batch.params[k].flatten(2), cols)  # (B, C_out, P)
            if i == batch.layer:  # layer l's equations: M x = z - b and G(delta) x = gW, U never formed
                misfit = torch.bmm(batch.delta, cols.transpose(1, 2)) - batch.g_w
                if batch.known_w is not None:
                    misfit = misfit * batch.known_w
                residual = (z - batch.z_minus_b).square().sum((1, 2)) + misfit.square().sum((1, 2))
        k += 1
        if layer.bias is not None:
            z = z + (batch.params[k][:, :, None] if z.dim() == 3 else batch.params[k])
            k += 1
        a = act(z if isinstance(layer, nn.Linear) else z.view(n, *model.shapes[i + 1]))
    loss = F.cross_entropy(a, batch.target, reduction="sum")  # each client's CE, its own gradient
    dummy = torch.autograd.grad(loss, batch.params, create_graph=True)
    if batch.known is not None:
        dummy = [d * k for d, k in zip(dummy, batch.known)]
    # cos(d, g) as d . (g / ||g||) / ||d||, the shared side normalised once per correction: F.cosine_similarity
    # normalises both sides at every step, and its backward's divisions were 15% of cnn6d's step
    cosine = sum(1 - torch.linalg.vecdot(d.flatten(1), u, dim=1) / torch.linalg.vector_norm(d.flatten(1), dim=1)
                 .clamp_min(1e-10) for d, u in zip(dummy, batch.shared))
    tv = (x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2, 3)) + (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3))
    return w_cos * cosine + w_tv * tv + w_sq * residual


@functools.cache
def compiled_grad_and_value() -> Callable:
    """One compiled (dJ/dx, J) of J's torch.func form for the whole process: the graphs of
    each (model, layer) are kept, so a sweep compiles each once; labels and images are
    tensor inputs."""
    dynamo = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):  # its current name, its older one
        if hasattr(dynamo, limit):
            setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime", on CPUs
    objective = functools.partial(hybrid_objective, functional=True)
    return torch.compile(torch.func.grad_and_value(objective, argnums=2), dynamic=False)


def hybrid(model: Net, grads: list[torch.Tensor], label: int, settings: AttackSettings,
           where: Where | None = None) -> AttackResult:
    """R-GAP's recursion with each convolution's least-squares solution corrected by
    gradient matching before it is passed down: at every layer (the paper's hybrid), or at
    those where `where` holds of the ranks (hybrid_free, which records the layers it corrected)."""
    return hybrids([model], [grads], [label], settings, where)[0]


def hybrids(models: list[Net], grads: list[list[torch.Tensor]], labels: list[int], settings: AttackSettings,
            where: Where | None = None, steps: list[SharedSteps | None] | None = None) -> list[AttackResult]:
    """`hybrid` on several clients' gradients (models of one architecture) in step: their
    recursions layer by layer, each within its own SharedSteps (`steps`), and the
    corrections at a layer gradient-matched together (gradient_matching_together)."""
    steps = steps or [None] * len(models)
    corrected: list[list[int]] = [[] for _ in models]
    method = dataclasses.replace(settings, correct_where="", verbose=False)  # what a correction reads

    def correct(todo: list[int], systems: list[LayerSystem], x_hats: list[torch.Tensor]) -> list[torch.Tensor]:
        keys, found = [], []
        for i, system, x_hat in zip(todo, systems, x_hats):
            corrected[i].append(system.layer)
            with sharing(steps[i]):  # a correction met before in this client's cell is taken, not made again
                keys.append(step_key(("correct", system.layer, x_hat, labels[i], method)))
                found.append(taken_step(keys[-1]))
        run = [j for j, value in enumerate(found) if value is MISSING]
        matched = [] if not run else gradient_matching_together(
            [models[todo[j]] for j in run], [systems[j] for j in run], [x_hats[j] for j in run],
            grads=[grads[todo[j]] for j in run], labels=[labels[todo[j]] for j in run], settings=settings)
        for j, x in zip(run, matched):
            with sharing(steps[todo[j]]):
                found[j] = kept_step(keys[j], x)
        return found
    reconstructions = recursive_reconstructions(models, grads, correct, settings.verbose, where,
                                                [known_entries(g, settings) for g in grads], steps)
    return [AttackResult(x.to(g[0].device), label,
                         {"rank_deficiency": deficiency} | ({} if where is None else {"corrected_layers": sorted(c)}))
            for (x, deficiency), c, g, label in zip(reconstructions, corrected, grads, labels)]


def attack_hybrid(model: Net, grads: list[torch.Tensor], label: int, settings: AttackSettings) -> AttackResult:
    """The paper's hybrid: every convolution corrected."""
    return hybrid(model, grads, label, settings)


def attack_hybrids(models: list[Net], grads: list[list[torch.Tensor]], labels: list[int], settings: AttackSettings,
                   steps: list[SharedSteps]) -> list[AttackResult]:
    """attack_hybrid on several clients together."""
    return hybrids(models, grads, labels, settings, steps=steps)


# -- hybrid_free: ours, not the paper's -------------------------------------------------
# Where every system from layer l up is full rank, the least-squares solution of layer l
# is determined by the shared gradient (up to conditioning): gradient matching can only move
# it away, and on leaky-ReLU models the inverse activations below multiply that move by
# 1/slope (docs/attacks.md: lenet). So correct only where the systems leave freedom. The
# rule reads the ranks alone, which the attacker has without the image: it stays inside the
# threat model.

CORRECT_WHERE: dict[str, Where] = {
    "free-at-or-above": lambda deficiency: any(r < 0 for r in deficiency),  # layer l or one above it
    "free-here": lambda deficiency: deficiency[0] < 0,  # layer l itself
}


def attack_hybrid_free(model: Net, grads: list[torch.Tensor], label: int, settings: AttackSettings) -> AttackResult:
    """The hybrid, correcting a convolution only where settings.correct_where says the
    systems leave it freedom; elsewhere R-GAP's least-squares solution is passed down."""
    return hybrid(model, grads, label, settings, CORRECT_WHERE[settings.correct_where])


def attack_hybrid_frees(models: list[Net], grads: list[list[torch.Tensor]], labels: list[int],
                        settings: AttackSettings, steps: list[SharedSteps]) -> list[AttackResult]:
    """attack_hybrid_free on several clients together."""
    return hybrids(models, grads, labels, settings, CORRECT_WHERE[settings.correct_where], steps)


# =============================================================================
# Baselines: DLG, iDLG (L-BFGS on ||dg||^2) and Cosine+TV
# =============================================================================


def lbfgs_attack(model: Net, grads: list[torch.Tensor], label: int | None, steps: int,
                 name: str) -> AttackResult:
    """Dummy image (and, where label is None, dummy label logits) ~ N(0, 1), L-BFGS lr 1."""
    device = grads[0].device
    x = torch.randn(1, *model.shapes[0], device=device, requires_grad=True)
    y = torch.randn(1, model.layers[-1].out_features, device=device, requires_grad=True) if label is None else None
    variables = [x] if y is None else [x, y]
    opt = torch.optim.LBFGS(variables, lr=1)

    def closure() -> torch.Tensor:
        target = torch.tensor([label], device=device) if y is None else y.softmax(-1)
        loss = squared_distance(dummy_gradient(model, model(x), target), grads)
        for v, g in zip(variables, torch.autograd.grad(loss, variables)):
            v.grad = g
        return loss

    last, losses = [v.detach().clone() for v in variables], []
    bar = progress(steps, name)
    for _ in bar:
        losses.append(opt.step(closure).item())  # the objective before this step
        if not all(torch.isfinite(v).all() for v in variables):  # diverged: keep the last finite
            break
        last = [v.detach().clone() for v in variables]
        bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
    found = label if y is None else int(last[1].argmax())
    with torch.no_grad():
        target = torch.tensor([found], device=device) if y is None else last[1].softmax(-1)
    final = squared_distance(dummy_gradient(model, model(last[0].requires_grad_()), target), grads).item()
    return AttackResult(last[0].detach(), found, objective_info(losses[:1], final))


def attack_dlg(model: Net, grads: list[torch.Tensor], label: int, settings: AttackSettings) -> AttackResult:
    """DLG (Zhu et al., NeurIPS 2019): image and soft label jointly, 300 steps in the paper;
    with --true-label the label is given instead."""
    label = label if settings.true_label else None
    return best_start(lambda: lbfgs_attack(model, grads, label, settings.dlg_iters, "dlg"), settings.restarts)


def attack_idlg(model: Net, grads: list[torch.Tensor], label: int, settings: AttackSettings) -> AttackResult:
    """iDLG (Zhao et al., 2020): the label from the last bias gradient (recover_label,
    unless --true-label), then DLG on the image alone."""
    return best_start(lambda: lbfgs_attack(model, grads, label, settings.dlg_iters, "idlg"), settings.restarts)


def attack_cosine(model: Net, grads: list[torch.Tensor], label: int, settings: AttackSettings) -> AttackResult:
    """Cosine+TV (Geiping et al., NeurIPS 2020) as the published code configured it:
    image ~ N(0, 1), Adam lr 1e-3, 4800 steps in the paper."""
    return best_start(lambda: cosine_start(model, grads, label, settings.cosine_iters), settings.restarts)


def cosine_start(model: Net, grads: list[torch.Tensor], label: int, steps: int) -> AttackResult:
    device = grads[0].device
    x = torch.randn(1, *model.shapes[0], device=device, requires_grad=True)
    target = torch.tensor([label], device=device)
    tv_weight = 0.01 * len(grads)  # the published code added 0.01 TV once per tensor
    opt = torch.optim.Adam([x], lr=1e-3)
    objective = lambda: cosine_distance(dummy_gradient(model, model(x), target), grads) + tv_weight * total_variation(x)  # noqa: E731
    first = objective().item()
    bar = progress(steps, "cosine")
    for step in bar:
        loss = objective()
        (x.grad,) = torch.autograd.grad(loss, [x])
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
    return AttackResult(x.detach(), label, objective_info([first], objective().item()))


# -- ATTACKS: one row per attack --------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """One row of ATTACKS: all that the program knows of an attack. Its order in ATTACKS
    is the figures' and tables' column order."""

    run: AttackFunction
    shown: str  # its name in figures, tables and printed lines
    marker: str  # its matplotlib marker in the figures
    paper: bool  # one of the paper's comparison: the default --attacks
    settings: tuple[str, ...] = ()  # the AttackSettings it reads beyond the label: a flag for one needs the attack
    together: Callable[..., list[AttackResult]] | None = None  # several clients' at once (answers_together)


ATTACKS: dict[str, Attack] = {
    "rgap": Attack(attack_rgap, "R-GAP", "o", paper=True),
    "dlg": Attack(attack_dlg, "DLG", "v", paper=True, settings=("dlg_iters", "restarts")),
    "idlg": Attack(attack_idlg, "iDLG", "^", paper=True, settings=("dlg_iters", "restarts")),
    "cosine": Attack(attack_cosine, "Cosine+TV", "D", paper=True, settings=("cosine_iters", "restarts")),
    "hybrid": Attack(attack_hybrid, "Hybrid", "s", paper=True,
                     settings=("hybrid_iters", "hybrid_iters_first", "compile"), together=attack_hybrids),
    "hybrid_free": Attack(attack_hybrid_free, "Hybrid, free layers", "P", paper=False,
                          settings=("hybrid_iters", "hybrid_iters_first", "compile", "correct_where"),
                          together=attack_hybrid_frees),
}


def paper_attacks() -> list[str]:
    """The default --attacks: the paper's comparison, in ATTACKS' order."""
    return [name for name, attack in ATTACKS.items() if attack.paper]


# =============================================================================
# Defences: what the client does to its gradient before it shares it
# =============================================================================
# The two standard single-gradient defences of the literature: additive Gaussian noise,
# with DP-SGD's clip-and-noise (Abadi et al., 2016) as its principled form, and pruning
# the entries of smallest magnitude (Zhu et al., 2019, Sec. 5; GradAttack's GradPrune).
# The client applies one to the whole gradient; every attack sees only what comes out.
#
# An attacker who sees pruning's zeros knows they are missing entries, not gradients that
# happen to be 0: R-GAP and the hybrid drop those equations (AttackSettings.zeros_are_missing),
# so each layer's rank deficiency, and the security index, can be computed under the
# defence before any attack. DLG, iDLG and Cosine+TV run unchanged, as in the literature.

class Param(NamedTuple):
    """A defence's parameter: its name in the record, its letter in a spec, its range, and
    how its canonical spelling writes it."""

    name: str
    letter: str  # as the usage writes it: noise:SIGMA
    valid: Callable[[float], bool]  # on a finite number
    rule: str  # what `valid` asks, for the refusal
    scientific: bool = False  # below 1 written 1e-4, 3e-2 (a noise level spans decades); else a decimal, 0.5

    def spelled(self, value: float) -> str:
        """The value's one spelling in a canonical spec."""
        if self.scientific and 0 < value < 1:
            mantissa, exponent = f"{value:.12e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return np.format_float_positional(value, trim="-")


@dataclass(frozen=True)
class DefenceKind:
    """One row of DEFENCES: all that the program knows of a kind of defence. Its order in
    DEFENCES is the figures' and tables' order."""

    params: tuple[Param, ...]
    apply: Callable[[list[torch.Tensor], dict[str, float], int], list[torch.Tensor]]  # (grads, params, seed)
    strength: Callable[[dict[str, float]], float]  # the figures' x for these parameters (none: 0)
    axis: str  # what that strength is, for the figures' axis ("" for none, which sits at 0 on every panel)
    symbol: str  # the strength's symbol, for the tables' headers
    what: str  # what it does, for --help
    seeded: bool = False  # draws noise from the seed (recorded)
    removes_equations: bool = False  # the shared zeros are missing entries, not equations (pruning)
    curve: tuple[str, ...] = ()  # the parameters held fixed along one curve of the figures (dp: its clip C)
    max_strength: float = math.inf  # beyond it the shared gradient would leave what float32 holds

    def usage(self, kind: str) -> str:
        return ":".join([kind, *(p.letter for p in self.params)])


NON_NEGATIVE = lambda v: v >= 0  # noqa: E731
# float32 holds up to 3.4e38: noise of a larger std, times a draw of a few units, overflows to
# inf in the shared gradient, and every solve and objective after it fails.
MAX_NOISE = 1e30


def add_noise(grads: list[torch.Tensor], sigma: float, seed: int) -> list[torch.Tensor]:
    """N(0, sigma^2) in every entry, from the CPU's generator: the same noise on any device,
    and the attacks' seeding untouched."""
    draw = torch.Generator().manual_seed(seed)
    return [g + sigma * torch.randn(g.shape, generator=draw, dtype=g.dtype).to(g.device) for g in grads]


def clip_then_noise(grads: list[torch.Tensor], p: dict[str, float], seed: int) -> list[torch.Tensor]:
    """DP-SGD's step for one example: clip the whole gradient to norm C, then add N(0, (Z C)^2)."""
    clipped = [g * min(1.0, p["clip"] / global_norm(grads)) for g in grads]
    return add_noise(clipped, p["noise_multiplier"] * p["clip"], seed)


DEFENCES: dict[str, DefenceKind] = {
    "none": DefenceKind((), lambda grads, p, seed: grads, lambda p: 0.0, "", "", "the default: the gradient itself"),
    "noise": DefenceKind((Param("sigma", "SIGMA", NON_NEGATIVE, "a finite number of at least 0", scientific=True),),
                         lambda grads, p, seed: add_noise(grads, p["sigma"], seed), lambda p: p["sigma"],
                         "the noise's standard deviation SIGMA", "SIGMA", "adds N(0, SIGMA^2) to every entry",
                         seeded=True, max_strength=MAX_NOISE),
    "prune": DefenceKind((Param("fraction", "P", lambda v: 0 <= v < 1, "in [0, 1)"),),
                         lambda grads, p, seed: [prune_smallest(g, p["fraction"]) for g in grads],
                         lambda p: p["fraction"], "the pruned fraction P", "P",
                         "zeroes the fraction P of each tensor's entries of smallest magnitude",
                         removes_equations=True),
    "dp": DefenceKind((Param("clip", "C", lambda v: v > 0, "a finite number above 0"),
                       Param("noise_multiplier", "Z", NON_NEGATIVE, "a finite number of at least 0")),
                      clip_then_noise, lambda p: p["noise_multiplier"] * p["clip"],
                      "the noise's standard deviation Z C", "Z C",
                      "DP-SGD: clips the whole gradient to norm C, then adds N(0, (Z C)^2)", seeded=True,
                      curve=("clip",), max_strength=MAX_NOISE),
}


def defence_usage() -> str:
    """'none, noise:SIGMA, dp:C:Z or prune:P', from DEFENCES."""
    *others, last = [kind.usage(name) for name, kind in DEFENCES.items()]
    return f"{', '.join(others)} or {last}"


class Defence(NamedTuple):
    """A defence as a spec gives it."""

    spec: str  # as given on the command line, e.g. "prune:0.9": the record's name for it
    kind: str  # a key of DEFENCES
    params: dict[str, float]  # its Params' names -> values

    @property
    def removes_equations(self) -> bool:
        return DEFENCES[self.kind].removes_equations

    @property
    def strength(self) -> float:
        return DEFENCES[self.kind].strength(self.params)


NO_DEFENCE = Defence("none", "none", {})


@functools.cache  # rows and figure points each ask again
def parse_defence(text: str) -> Defence:
    """KIND:VALUE:... as DEFENCES declares it; anything else is one line (UserError)."""
    kind, *values = text.split(":")
    if kind not in DEFENCES:
        raise UserError(f"--defence '{text}': unknown kind '{kind}' (expected {defence_usage()})")
    params = DEFENCES[kind].params
    if len(values) != len(params):
        form = ":".join([kind, *(p.name.upper() for p in params)])
        raise UserError(f"--defence '{text}': expected {form}")
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise UserError(f"--defence '{text}': '{':'.join(values)}' is not a number") from None
    for param, value in zip(params, numbers):
        if not (math.isfinite(value) and param.valid(value)):
            raise UserError(f"--defence '{text}': {param.name} must be {param.rule}, not {value:g}")
    values = {p.name: v for p, v in zip(params, numbers)}
    strength = DEFENCES[kind].strength(values)
    if not strength <= DEFENCES[kind].max_strength:
        raise UserError(f"--defence '{text}': {DEFENCES[kind].axis} is {strength:g}, beyond the "
                        f"{DEFENCES[kind].max_strength:g} above which the shared gradient leaves what float32 holds")
    spec = ":".join([kind, *(p.spelled(v) for p, v in zip(params, numbers))])  # noise:0.01 and noise:1e-2 are one
    return Defence(spec, kind, values)


def defence_seed(seed: int, image: str) -> int:
    """The noise's seed for one image: from the run's --seed, so the same command gives the
    same noise and another seed another. Every noise level scales the same draw (common
    random numbers: a curve over SIGMA is not also a curve over draws)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{image}".encode()).digest()[:4], "little")


def global_norm(grads: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum(g.double().square().sum() for g in grads)))


def prune_smallest(g: torch.Tensor, fraction: float) -> torch.Tensor:
    """g with floor(fraction * n) of its n entries, those of smallest magnitude, set to 0
    (ties broken by position: the earlier entry goes first)."""
    k = math.floor(fraction * g.numel())
    order = torch.sort(g.abs().flatten(), stable=True).indices
    out = g.flatten().clone()
    out[order[:k]] = 0
    return out.view_as(g)


def defend(grads: list[torch.Tensor], defence: Defence, seed: int) -> tuple[list[torch.Tensor], dict]:
    """The gradient the client shares under `defence`, and what results.json records of it:
    the spec, its parameters, the noise's seed and the gradient's norm before and after."""
    kind = DEFENCES[defence.kind]
    record = {"spec": defence.spec, "kind": defence.kind, **defence.params} | ({"seed": seed} if kind.seeded else {})
    before, shared = global_norm(grads), kind.apply(grads, defence.params, seed)
    return shared, record | {"norm_before": before, "norm_after": global_norm(shared)}


def surviving(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per parameter, the entries a pruned gradient still holds (its nonzeros): the
    equations R-GAP and the hybrid keep under pruning."""
    return [g != 0 for g in grads]


def fc_inputs_undetermined(model: Net, known: list[torch.Tensor]) -> float:
    """The fraction of the fc layer's inputs a_j that no surviving equation gW_ij = d_i a_j
    with d_i = gb_i surviving determines (invert_pruned_fc leaves them at 0, the minimum
    norm). The paper's index counts the convolutions' systems only and weighs the top layer
    0; this is what pruning takes from the fc's inversion, for reading the index beside."""
    known_w, known_b = by_layer(model, known)[model.first_linear]
    return float((~(known_w & known_b[:, None]).any(0)).double().mean())


# =============================================================================
# Metrics
# =============================================================================


def score(target: np.ndarray, recon: np.ndarray) -> dict[str, float]:
    """PSNR (data range 1; the published code's 20 log10(255) on [0, 1] images added
    48.13 dB) and SSIM of HWC images in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    recon = np.nan_to_num(recon, nan=0.5)
    with np.errstate(divide="ignore"):  # an exact reconstruction has infinite PSNR
        psnr = peak_signal_noise_ratio(target, recon, data_range=1)
    return {"psnr": float(psnr),
            "ssim": float(structural_similarity(target, recon, channel_axis=-1, data_range=1))}


def inf_to_none(value: float) -> float | None:
    """JSON has no infinity: an exact reconstruction's PSNR is stored as null."""
    return value if math.isfinite(value) else None



# =============================================================================
# The experiment on one cell (model, image, defence), and the analysis of the security index
# =============================================================================


class Training(NamedTuple):
    """How the model of one (model, image) was trained before the client's gradient."""

    info: dict  # steps, lr, batch, seed, data, final_loss, diverged


class Skipped(NamedTuple):
    """Attacks that have nothing to attack on one (model, image), and why."""

    attacks: list[str]
    why: str


class RankAnalysis(NamedTuple):
    """Each convolution's rank deficiency, from R-GAP's recursion, for one (model, image)."""

    deficiency: list[int]


class Defended(NamedTuple):
    """What the client's defence did to its gradient (defend's record); under pruning,
    with the rank deficiencies of the equations that survive."""

    info: dict


class Answer(NamedTuple):
    """One attack's answer to the shared gradient, scored."""

    attack: str
    entry: dict  # for results.json: psnr, ssim, seconds, label, label_correct, the attack's info
    recon: np.ndarray  # the reconstruction, HWC in [0, 1]


def score_answer(name: str, result: AttackResult, seconds: float, image: PrivateImage) -> Answer:
    """The attack's answer scored against `image`; with a captured gradient and no target,
    PSNR and SSIM null (the entry's target is null: nothing to score), and the label's
    correctness null where no label was given."""
    recon = to_image(result.x, image.normalize)
    scores = {"psnr": None, "ssim": None}
    if image.x is not None:
        metrics = score(to_image(image.x, image.normalize), recon)
        scores = {"psnr": inf_to_none(metrics["psnr"]), "ssim": metrics["ssim"]}
    entry = scores | {"seconds": round(seconds, 3), "label": result.label,
                      "label_correct": None if image.label is None else result.label == image.label, **result.info}
    return Answer(name, entry, recon)


def share_and_attack(model: Net, image: PrivateImage, attacks: list[str], settings: AttackSettings, seed: int,
                     device: str, defence: Defence = NO_DEFENCE,
                     analyse_defence: bool = True) -> Iterator[Defended | Answer]:
    """The paper's experiment on one cell (model, image, defence): the client shares its gradient,
    defended, and each attack answers from what was shared alone, reseeded first. Yields
    what the defence did (under pruning with the ranks of the surviving equations, unless
    analyse_defence is False), then each attack's Answer as it finishes (R-GAP's carries
    the rank deficiencies of its recursion)."""
    for _, event in share_and_attack_together([(model, image)], attacks, settings, seed, device, defence,
                                              [analyse_defence]):
        yield event


def share_and_attack_together(cells: list[tuple[Net, PrivateImage]], attacks: list[str], settings: AttackSettings,
                              seed: int, device: str, defence: Defence = NO_DEFENCE,
                              analyse_defence: list[bool] | None = None) -> Iterator[tuple[int, Defended | Answer]]:
    """share_and_attack on several (model, image) of one architecture under one defence
    (analyse_defence per cell): (the cell's index, its event). The attacks answer them
    together (answers_together)."""
    clients = []
    for i, (model, image) in enumerate(cells):
        grads = shared_gradient(model, image, device)
        shared, info = defend(grads, defence, defence_seed(seed, image.name))
        # the analyst's: the client's own gradient, the surviving rows
        if defence.removes_equations and (analyse_defence is None or analyse_defence[i]):
            known = surviving(shared)
            info |= {"rank_deficiency": rank_deficiency(model, grads, known),
                     "fc_inputs_undetermined": fc_inputs_undetermined(model, known)}
        yield i, Defended(info)
        del grads  # from here on, the attacks' side: what was shared alone
        label = image.label if settings.true_label else recover_label(shared)  # under noise it may be wrong
        clients.append((model, shared, label))
    settings = dataclasses.replace(settings, zeros_are_missing=defence.removes_equations)  # an attacker sees the zeros
    for i, name, result, seconds in answers_together(clients, attacks, settings, seed):
        yield i, score_answer(name, result, seconds, cells[i][1])


def answers(model: Net, shared: list[torch.Tensor], label: int, attacks: list[str], settings: AttackSettings,
            seed: int) -> Iterator[tuple[str, AttackResult, float]]:
    """Each attack's answer to the shared gradient, reseeded first, with its seconds. The
    recursion's steps are shared among the attacks (SharedSteps); an attack that ran no step
    of its own and answers as an earlier one did, bit for bit, is marked `derived_from` it."""
    for _, name, result, seconds in answers_together([(model, shared, label)], attacks, settings, seed):
        yield name, result, seconds


Client = tuple  # (model, shared gradient, label): one cell's side of the attacks


def answers_together(clients: list[Client], attacks: list[str], settings: AttackSettings,
                     seed: int) -> Iterator[tuple[int, str, AttackResult, float]]:
    """`answers` of several cells (models of one architecture), attack by attack: (the
    client's index, the attack, its result, its seconds). An attack with a `together` form
    answers all of them at once (their seconds shared out evenly, recorded as
    `batch_size`); the others one client at a time. Each client keeps its own SharedSteps."""
    steps, done = [SharedSteps() for _ in clients], [{} for _ in clients]

    def marked(i: int, name: str, result: AttackResult, before: tuple[int, int]) -> AttackResult:
        if steps[i].computed == before[0] and steps[i].taken > before[1]:  # every step it took was another's
            same = next((other for other, x in done[i].items() if torch.equal(x, result.x)), None)
            if same is not None:
                result.info["derived_from"] = same
        done[i][name] = result.x
        return result
    for name in attacks:
        attack = ATTACKS[name]
        if attack.together is not None and len(clients) > 1:
            seed_everything(seed)  # as before each client's run alone: so any subset and order gives these numbers
            before, start = [(s.computed, s.taken) for s in steps], time.perf_counter()
            results = attack.together(*map(list, zip(*clients)), settings, steps)
            seconds = (time.perf_counter() - start) / len(clients)
            for i, result in enumerate(results):
                result.info["batch_size"] = len(clients)
                yield i, name, marked(i, name, result, before[i]), seconds
            continue
        for i, (model, shared, label) in enumerate(clients):
            with sharing(steps[i]):
                seed_everything(seed)  # so any subset of the attacks, in any order, gives the same numbers
                before, start = (steps[i].computed, steps[i].taken), time.perf_counter()
                result = attack.run(model, shared, label, settings)
                seconds = time.perf_counter() - start
            yield i, name, marked(i, name, result, before), seconds


def rank_analysis(model: Net, image: PrivateImage, device: str) -> RankAnalysis:
    """Each convolution's rank deficiency for the client's gradient on `image`: R-GAP's
    recursion alone, no attack."""
    return RankAnalysis(rank_deficiency(model, shared_gradient(model, image, device)))


_UNDEFENDED_RANKS: dict[tuple, list[int]] = {}  # undefended_ranks' cache: the last (model, image)'s, in this process


def undefended_ranks(key: tuple, model: Net, image: PrivateImage, device: str) -> RankAnalysis:
    """rank_analysis once per (model, image) of a sweep, `key` naming the model the client
    holds and its image: every defence of a grid shares the client's gradient, and so its
    ranks, and a worker is handed a (model, image)'s defences one after another."""
    if key not in _UNDEFENDED_RANKS:
        _UNDEFENDED_RANKS.clear()
        _UNDEFENDED_RANKS[key] = rank_analysis(model, image, device).deficiency
    return RankAnalysis(list(_UNDEFENDED_RANKS[key]))


def nothing_to_attack(model: Net, image: PrivateImage, device: str) -> str | None:
    """Why the client's gradient on `image` cannot be attacked, or None. A gradient that is
    not finite (a model whose training diverged shares NaNs) makes every linear system and
    every objective NaN; one that is exactly zero (a saturated output layer) carries nothing:
    no label to read, every system 0 = 0, every objective flat."""
    grads = shared_gradient(model, image, device)
    if not all(torch.isfinite(g).all() for g in grads):
        weights = all(torch.isfinite(p).all() for p in model.parameters())
        return "the client's gradient is not finite" + (
            "" if weights else " (the model's weights are not: its training diverged)")
    if not any(g.any() for g in grads):
        return "the client's gradient is exactly zero, so it carries nothing to attack (a saturated output layer?)"
    return None


def analyse_images(exp: Experiment, images: list[PrivateImage]) -> int:
    """Rank deficiency per layer and the security index, without running an attack.

    One table per (model, image), and one per pruning defence of --defence (the equations
    that survive it); over several images, the security index per model (mean and range):
    the paper's architecture comparison. A cell that cannot be analysed (a gradient that is
    not finite, memory that runs out) is one line on stderr, and the exit status is 1; the
    others are analysed.
    """
    table, failed = [], 0
    defences = [parse_defence(spec) for spec in exp.defences]
    prunings = [d for d in defences if d.removes_equations]
    keeping = [DEFENCES[k].usage(k) for k in dict.fromkeys(d.kind for d in defences if d not in prunings)
               if k != "none"]
    if keeping:
        say(f"{' and '.join(keeping)} leave every equation in place: the ranks under them are the undefended ones")
    for name in exp.models:
        indices = []
        for image in images:
            model, _ = prepare_model(exp, name, image)
            why = nothing_to_attack(model, image, exp.device)
            if why is None:
                try:
                    grads = shared_gradient(model, image, exp.device)
                    deficiency = rank_deficiency(model, grads)
                    known = [surviving(defend(grads, d, 0)[0]) for d in prunings]
                    pruned = [rank_deficiency(model, grads, k) for k in known]
                except Exception as e:  # as a sweep's cell: this one is lost, the rest go on
                    why = sweeps.reason(e)
            if why is not None:
                print(f"hybrid.py: {name} on {image.name}: {why}", file=sys.stderr)
                failed += 1
                continue
            indices.append(security_index(deficiency))
            unknowns = [math.prod(shape) for shape in model.shapes[:-1]]
            say_ranks(model, f"{name} on {image.name}", deficiency, unknowns)
            for d, under, k in zip(prunings, pruned, known):
                say_ranks(model, f"{name} on {image.name} under {d.spec}", under, unknowns, k)
                say(f"  and {fc_inputs_undetermined(model, k):.1%} of the fc's inputs left undetermined")
        if indices:
            table.append((name, np.mean(indices), min(indices), max(indices)))
    if len(images) > 1 and table:
        say(f"\nsecurity index over {len(images)} images")
        say("| model | mean | min | max |\n|---|---|---|---|")
        for name, mean, lo, hi in table:
            say(f"| {name} | {mean:.1f} | {lo} | {hi} |")
    return 1 if failed else 0


def say_ranks(model: Net, title: str, deficiency: list[int], unknowns: list[int],
              known: list[torch.Tensor] | None = None) -> None:
    """One (model, image)'s table of ranks and both indices; under pruning, of the
    equations that survive it (`known`, per parameter)."""
    say(f"{title}: security index {security_index(deficiency)}, "
        f"worst layer's fraction {worst_layer_fraction(deficiency, unknowns):.4f}")
    say(f"  {'layer':>5} {'input':>9} {'unknowns':>9} {'equations':>10} {'rank':>6} {'deficiency':>11}")
    for layer, r in enumerate(deficiency):
        shape, n = model.shapes[layer], math.prod(model.shapes[layer])
        weights = model.layers[layer].weight.numel() if known is None else int(by_layer(model, known)[layer][0].sum())
        equations = math.prod(model.shapes[layer + 1]) + weights
        say(f"  {layer:5d} {'x'.join(map(str, shape)):>9} {n:9d} {equations:10d} {n + r:6d} {r:11d}")


# =============================================================================
# The same from Python: attack and analyse a gradient computed elsewhere
# =============================================================================
#
#     model = MyNet(); ...                      # the client's model, with its weights
#     gradient = [p.grad for p in model.parameters()]   # or {n: p.grad for n, p in ...}
#     results = hybrid.attack(model, gradient, (1, 28, 28), attacks=("rgap", "hybrid"))
#     results["rgap"].x, results["rgap"].label   # (1, C, H, W) in the model's input space
#
# What `--model PATH.py:NAME --weights FILE --gradient FILE` does, by the same functions:
# read_module, captured_gradient, recover_label and each attack's row of ATTACKS.


def attack(model: nn.Module, gradient: list | tuple | dict | str, input_shape: tuple[int, int, int], *,
           attacks: tuple[str, ...] = ("rgap", "hybrid"), label: int | None = None, seed: int = PUBLISHED_SEED,
           **settings: object) -> dict[str, AttackResult]:
    """The attacks on `gradient`, the gradient of one image shared by `model` as it is now.

    model: your nn.Module (read with torch.fx, as --model PATH.py:NAME is), or a Net.
    gradient: a tensor per parameter in model.parameters() order, a dict of them by
        parameter name, or the path of a file torch.save wrote either to.
    input_shape: (C, H, W) of the model's input.
    attacks: names in ATTACKS; label: the true label, handed to every attack (None: read
        from the gradient, iDLG's rule); seed: set before each attack; settings: fields of
        AttackSettings (hybrid_iters_first=2500, ...), the paper's by default.
    Returns {attack: AttackResult}: .x the reconstruction in the model's input space, of
    shape (1, C, H, W), and .label the label it used. A model, gradient or setting the
    attacks cannot take raises UserError (or TypeError, for a setting that is none), naming it."""
    unknown = [name for name in attacks if name not in ATTACKS]
    if unknown:
        raise UserError(f"attack '{unknown[0]}' is none of {', '.join(ATTACKS)}")
    method = AttackSettings(**settings)  # an unknown setting is a TypeError naming it
    net, shared = read_inputs(model, gradient, input_shape)
    used = recover_label(shared) if label is None else int(label)
    return {name: result for name, result, _ in answers(net, shared, used, list(attacks), method, seed)}


def analyse(model: nn.Module, gradient: list | tuple | dict | str, input_shape: tuple[int, int, int]) -> dict:
    """Each layer's rank deficiency for `gradient` (R-GAP's recursion, no attack), its
    unknowns, and both indices: what --analyse prints, as a dict."""
    net, shared = read_inputs(model, gradient, input_shape)
    deficiency = rank_deficiency(net, shared)
    unknowns = [math.prod(shape) for shape in net.shapes[:-1]]
    return {"rank_deficiency": deficiency, "unknowns": unknowns, "security_index": security_index(deficiency),
            "worst_layer_fraction": worst_layer_fraction(deficiency, unknowns)}


def read_inputs(model: nn.Module, gradient: list | tuple | dict | str,
                input_shape: tuple[int, int, int]) -> tuple[Net, list[torch.Tensor]]:
    """attack's and analyse's arguments as the attacks take them: the model's chain (its own
    layers, not a copy) and the gradient matched to its parameters."""
    shape = tuple(int(n) for n in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"input_shape {tuple(input_shape)}: expected (C, H, W)")
    net = model if isinstance(model, Net) else read_module(model, shape, f"the model ({type(model).__name__})")
    if isinstance(gradient, (str, os.PathLike)):
        captured = load_gradient(os.fspath(gradient), shape)
    else:
        captured = as_captured(gradient, "gradient", "the gradient", shape)
    return net, captured_gradient(net, captured)


# =============================================================================
# Sweeps of the experiment: the record's rows, older records, and what sweeps.py is handed
# =============================================================================

CSV_COLUMNS = ("model", "image", "defence", "attack", "label", "label_correct", "psnr", "ssim", "seconds",
               *report.INDICES)  # results.csv's: the first of each row's fields


def row(entry: dict, attack: str) -> dict:
    """One attack on one cell, as report.py reads it and results.csv writes it (CSV_COLUMNS),
    from the cell's entry in results.json. The indices are those of the equations the
    attacker has: under pruning, of the surviving ones (noise leaves every equation in place)."""
    e, defence = entry["attacks"][attack], entry["defence"]
    has = defence if "rank_deficiency" in defence else entry
    d = parse_defence(defence["spec"])
    scored = report.scored(entry)  # a captured gradient with no target: PSNR and SSIM NaN
    return {"model": entry["model"], "image": entry["image"], "defence": d.spec, "attack": attack,
            "label": e["label"], "label_correct": e["label_correct"],  # null where no label was given
            "psnr": math.nan if not scored else math.inf if e["psnr"] is None else e["psnr"],  # null: exact
            "ssim": e["ssim"] if scored else math.nan, "seconds": e["seconds"],
            **{k: has.get(k) for k in report.INDICES},
            "kind": d.kind, "strength": d.strength, "curve": curve_of(d),
            "first_activation": first_activation(entry.get("architecture") or entry["model"]),
            "fc_inputs_undetermined": defence.get("fc_inputs_undetermined", math.nan) if d.removes_equations else 0.0}


def curve_of(defence: Defence) -> str:
    """Which curve of its kind a defence lies on, as the figures name it: its parameters held
    fixed along one ("C=1" for dp:1:Z); "" for a kind of one curve."""
    kind = DEFENCES[defence.kind]
    return ", ".join(f"{p.letter}={defence.params[p.name]:g}" for p in kind.params if p.name in kind.curve)


def first_activation(text: str) -> str:
    """The activation after a model's first convolution (with a leaky ReLU's slope), from
    its name or its recorded architecture: the study figure's colour, since a leaky ReLU's
    inverse divides by its slope, so errors grow on the way down."""
    first = re.match(r"\d+k[\dx]+s[\dx]+p[\dx]+b?-([a-z]+)([0-9.]*)", MODELS.get(text, text))
    if first is None or first[1] not in ACTIVATIONS:
        return "other"
    return f"leaky {leaky_slope(first[1] + first[2]):g}" if first[1] == "leaky" else first[1]  # softplus2: softplus


RENAMED = {"indices": "image_indices", "images": "image_files"}  # config keys: older name -> this version's


def upgraded(results: dict) -> dict:
    """results.json as this version writes it, from any earlier version's (in place): the
    one place that knows older run folders. Settings renamed since (RENAMED), and an
    attack's best start (then "kept"). Before
    defences an entry had none (it is `none`'s); before the worst layer's fraction it had
    the security index alone (both indices follow from its rank deficiencies and each
    layer's unknowns).

    Reading a record runs nothing it names. An entry's unknowns are its own (`unknowns`,
    recorded since module files were named by their content) or its architecture string's;
    an older entry of a module file states neither, and its worst layer's fraction stays
    unknown (null), said once: its file is not read back."""
    config = results.get("config", {})
    for old, new in RENAMED.items():
        if old in config:
            config[new] = config.pop(old)
    if not config.get("image_files") and "label" in config:  # recorded before it was the files' alone
        config["label"] = None
    if config and "input_shape" not in config:  # before other datasets: CIFAR-10's, the photographs' or files'
        config |= {"input_shape": list(PHOTOGRAPH_SHAPE), "classes": PHOTOGRAPH_CLASSES}
    shape = config.get("input_shape")
    shape = tuple(shape) if isinstance(shape, list) and len(shape) == 3 and all(
        isinstance(n, int) and n > 0 for n in shape) else PHOTOGRAPH_SHAPE
    if isinstance(config.get("defences"), list):  # specs and models in their one spelling, as now recorded
        config["defences"] = list(dict.fromkeys(canonical_spec(d) for d in config["defences"]))
    if isinstance(config.get("models"), list):
        config["models"] = list(dict.fromkeys(canonical_name(m) for m in config["models"]))
    unstated = []
    for entry in results["runs"]:
        entry.setdefault("defence", {"spec": "none"})
        entry["defence"]["spec"] = canonical_spec(entry["defence"]["spec"])
        entry["model"] = canonical_name(entry["model"])
        for answer in entry.get("attacks", {}).values():  # a best start was recorded as "kept"
            if "kept" in answer and "starts" in answer:
                answer["best_start"] = answer.pop("kept")
        for has in (entry, entry["defence"]):
            if has.get("rank_deficiency") is not None and any(has.get(k) is None for k in report.INDICES):
                unknowns = recorded_unknowns(entry, shape)
                has |= indices_of(has["rank_deficiency"], unknowns)
                if unknowns is None:
                    unstated.append(entry["model"])
    if unstated:
        warn_once(f"{printable(unstated[0], 80)}{' and others' if len(set(unstated)) > 1 else ''}: recorded before the "
             "record stated each layer's unknowns, in words the grammar does not read, and a module file is "
             "never read back: its worst layer's fraction stays unknown")
    return results


@functools.cache  # a merge reads each folder twice (before its lock, and under it): said once a process
def warn_once(text: str) -> None:
    warn(text)


def recorded_unknowns(entry: dict, shape: tuple[int, int, int]) -> list[int] | None:
    """An entry's unknowns per layer, from the record alone: its own, or its architecture
    string's (the grammar is parsed, nothing run: a module's recorded architecture where the
    grammar reads it); None where neither states them."""
    if isinstance(entry.get("unknowns"), list):
        return entry["unknowns"]
    text = entry.get("architecture") if is_module_model(entry["model"]) else entry["model"]
    if not isinstance(text, str):  # a module's, recorded before its architecture was
        return None
    try:
        return [math.prod(s) for s in layer_shapes(architecture(text, shape), shape=shape)[:-1]]
    except UserError:  # not in the grammar's words (a KxK' kernel, a hidden fcN)
        return None


def canonical_spec(spec: str) -> str:
    """A recorded defence spec in its canonical spelling (as it was, where it no longer parses)."""
    try:
        return parse_defence(spec).spec
    except UserError:
        return spec


def canonical_name(model: str) -> str:
    """A recorded model in its canonical name (as it was, where it no longer parses; a
    module's FILE.py:NAME@HASH, or an older record's PATH.py:NAME, as it is: its file is
    never read back)."""
    if is_module_model(model):
        return model
    try:
        return canonical_model(model)
    except UserError:
        return model


def upgraded_key(key: tuple) -> tuple:
    """A grid.json key as this version names the cell: the model's and the defence's one spelling."""
    model, image, *defence = key
    return cell_key(canonical_name(model), image, canonical_spec(defence[0]) if defence else "none")


def rows_in(results: dict) -> list[dict]:
    """Every attack a results.json holds, as rows (the study scripts read committed runs so)."""
    return [row(entry, attack) for entry in upgraded(results)["runs"] for attack in entry.get("attacks", {})]


def names(config: dict | None = None) -> report.Names:
    """What report.py's figures and tables call the attacks and the defences (their rows'),
    and the classes of a record's data (CIFAR-10's, where it does not name them: the
    photographs, and --image files with 10 classes)."""
    return report.Names({name: (a.shown, a.marker) for name, a in ATTACKS.items()},
                        {kind: (d.axis, d.symbol) for kind, d in DEFENCES.items() if kind != "none"},
                        class_names(config or {}))


def class_names(config: dict) -> tuple[str, ...]:
    name = dataset_of(config.get("source") or "cifar10")[0]
    if name in DATASETS and not config.get("image_files"):
        return DATASETS[name].classes
    return CIFAR10_CLASSES if config.get("classes", PHOTOGRAPH_CLASSES) == PHOTOGRAPH_CLASSES else ()


def removing_equations() -> set[str]:
    """The defence kinds whose shared zeros are missing entries: report.py's pruning figure and table."""
    return {kind for kind, d in DEFENCES.items() if d.removes_equations}


def finish(folder: sweeps.RunFolder) -> None:
    """What a sweep and a merge end with: report.py's figures and summaries."""
    report.finish(folder, names(folder.results.get("config")), removing_equations())


def is_entry(entry: object) -> bool:
    """A cell's entry of results.json's runs as record_event writes it (what resume, merge
    and the summaries read), every field of the type it is written with: a record that was
    edited by hand is refused, not trusted until a figure fails on a string."""
    if not (isinstance(entry, dict) and isinstance(entry.get("model"), str) and isinstance(entry.get("image"), str)):
        return False
    attacks, defence, skipped = entry.get("attacks", {}), entry.get("defence", {}), entry.get("skipped", {})
    return (isinstance(attacks, dict) and all(a in ATTACKS and is_answer(e) for a, e in attacks.items())
            and isinstance(defence, dict) and isinstance(defence.get("spec", ""), str)
            and all(has_ranks(e) for e in (entry, defence)) and has_unknowns(entry)
            and isinstance(skipped, dict) and all(isinstance(v, str) for v in skipped.values()))


def is_number(value: object, or_null: bool = False) -> bool:
    return (value is None and or_null) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def is_answer(e: object) -> bool:
    """An attack's record: its scores, time and label, typed."""
    return (isinstance(e, dict) and is_number(e.get("psnr"), or_null=True) and is_number(e.get("ssim"), or_null=True)
            and is_number(e.get("seconds")) and isinstance(e.get("label"), int) and not isinstance(e.get("label"), bool)
            and (e.get("label_correct") is None or isinstance(e.get("label_correct"), bool))
            and {"psnr", "ssim", "label_correct"} <= e.keys())


def has_ranks(e: dict) -> bool:
    """Rank deficiencies and indices, where a record holds them, typed."""
    ranks = e.get("rank_deficiency")
    return ((ranks is None or (isinstance(ranks, list) and all(is_number(r) for r in ranks)))
            and all(is_number(e.get(index), or_null=True) for index in report.INDICES))


def has_unknowns(entry: dict) -> bool:
    """Each layer's unknowns, where the entry states them: positive integers, one a layer
    of its rank deficiencies."""
    unknowns, ranks = entry.get("unknowns"), entry.get("rank_deficiency")
    return unknowns is None or (isinstance(unknowns, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in unknowns)
        and (ranks is None or len(ranks) == len(unknowns)))


class Cell(NamedTuple):
    """One (model, image, defence) of a sweep, with what is left to do on it."""

    model: str
    image: PrivateImage
    attacks: list[str]  # the attacks not yet recorded
    ranks_known: bool  # its entry holds the rank deficiencies already (and, under pruning, those under it)
    defence: Defence = NO_DEFENCE

    @property
    def key(self) -> tuple[str, ...]:
        return cell_key(recorded_model(self.model), self.image.name, self.defence.spec)

    @property
    def parts(self) -> list[str]:  # what sweeps.py calls a unit's parts
        return self.attacks


def cell_key(model: str, image: str, defence: str) -> tuple[str, ...]:
    """A cell's name in the record and its grid.json: (model, image) undefended, (model,
    image, defence) under a defence."""
    return (model, image) + (() if defence == "none" else (defence,))


def entry_key(entry: dict) -> tuple[str, ...]:
    return cell_key(entry["model"], entry["image"], entry["defence"]["spec"])  # upgraded: every entry has one


def left_to_do(cell: Cell, entry: dict | None) -> Cell | None:
    """The cell less what its entry of the record holds (attacks done, or skipped: a
    gradient with nothing to attack stays so); None when nothing is left."""
    entry = entry or {}
    done = entry.get("attacks", {}).keys() | entry.get("skipped", {}).keys()
    todo = [a for a in cell.attacks if a not in done]
    known = "rank_deficiency" in entry and (not cell.defence.removes_equations
                                            or "rank_deficiency" in entry.get("defence", {}))
    return cell._replace(attacks=todo, ranks_known=known) if todo else None


def run_cells(exp: Experiment, settings: AttackSettings, cells: tuple[Cell, ...]) -> Iterator[tuple[Cell, object]]:
    """Cells of one model and defence (cells_together), each as the client holds its model
    (trained first with --train-steps), with its rank deficiencies where the record lacks
    them and R-GAP will not give them; then the experiment on them together: (cell, event)."""
    ready = []
    for cell in cells:
        model, training = prepare_model(exp, cell.model, cell.image)
        if training is not None:
            yield cell, Training(training)
        why = nothing_to_attack(model, cell.image, exp.device)
        if why is not None:
            yield cell, Skipped(cell.attacks, why)
            continue
        if not cell.ranks_known and ("rgap" not in cell.attacks or cell.defence != NO_DEFENCE):
            held = (cell.model, cell.image.name, exp.model_seed, exp.train_steps, exp.train_lr, exp.data, exp.device)
            yield cell, undefended_ranks(held, model, cell.image, exp.device)  # R-GAP's, under a defence, are not
        ready.append((cell, model))  # the client's
    if not ready:
        return
    analyse = [not cell.ranks_known for cell, _ in ready]
    for i, event in share_and_attack_together([(model, cell.image) for cell, model in ready], ready[0][0].attacks,
                                              settings, exp.seed, exp.device, ready[0][0].defence,
                                              analyse_defence=analyse):
        yield ready[i][0], event


def cells_together(settings: AttackSettings, cells: list[Cell]) -> list[tuple[Cell, ...]]:
    """The cells left, in units worked on together: up to --batch-images cells of one model,
    defence and attacks left, where an attack among them answers several at once (the
    hybrids, without --compile). The first unit of each such group, then the second, and
    so on (a study stopped part-way holds whole sets of images); within each, the costliest
    models' first, so that the workers finish together. Single cells keep their order."""
    batched = settings.batch_images > 1 and not settings.compile
    units: dict[tuple, list[list[Cell]]] = {}
    for n, cell in enumerate(cells):
        together = batched and any(ATTACKS[a].together for a in cell.attacks)
        key = (cell.model, cell.defence.spec, tuple(cell.attacks)) if together else n
        groups = units.setdefault(key, [[]])
        if len(groups[-1]) == settings.batch_images:
            groups.append([])
        groups[-1].append(cell)
    order = {cell.key: n for n, cell in enumerate(cells)}
    ranked = [(k, -model_cost(g[0]) if isinstance(key, tuple) else 0, order[g[0].key], g)
              for key, groups in units.items() for k, g in enumerate(groups)]
    return [tuple(g) for *_, g in sorted(ranked, key=lambda r: r[:3])]


def model_cost(cell: Cell) -> float:
    """The solves' flops of the cell's model, up to a constant (solve_cost); 0 for a module's."""
    return 0.0 if is_model_file(cell.model) else solve_cost(architecture(cell.model, cell.image.shape))[0]


def model_text(model: str, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> str:
    """A model's architecture as the record states it."""
    return module_layout(model, shape)[0] if is_model_file(model) else str(architecture(model, shape))


def model_stem(model_name: str) -> str:
    """A model as file and folder names give it: a zoo name, or 'arch-' and a hash of its
    architecture string (the record holds the string), or a module's NAME-HASH (its content's)."""
    module = MODEL_FILE.fullmatch(model_name) or RECORDED_MODULE.fullmatch(model_name)
    if module is not None:  # lenet.py:LeNet@3fa2b1c0d9 -> LeNet-3fa2b1c0d9
        return f"{module['name']}-{module['hash'] or hashlib.sha256(model_name.encode()).hexdigest()[:10]}"
    return model_name if model_name in MODELS else "arch-" + hashlib.sha256(model_name.encode()).hexdigest()[:10]


def file_stem(model_name: str, image: PrivateImage, defence: Defence = NO_DEFENCE) -> str:
    """Where a cell's arrays go: 'cnn4_c2_samples-chelsea', 'cnn4_c2_file-cat_png_3fa2b1c0d9',
    'cnn4_c2_cifar10-test-3_prune-0_9_<hash>'. Letters, digits, '-' and '_' only; distinct images
    keep distinct stems (a file's name ends in its hash), and so do distinct defences."""
    safe = lambda text: re.sub("[^A-Za-z0-9_-]", "_", text)  # noqa: E731
    stem = f"{model_stem(model_name)}_{safe(image.name.replace(':', '-', 1))}"
    if defence == NO_DEFENCE:
        return stem
    return f"{stem}_{safe(defence.spec.replace(':', '-'))}_{hashlib.sha256(defence.spec.encode()).hexdigest()[:6]}"


def record_event(folder: sweeps.RunFolder, cell: Cell, event: Training | RankAnalysis | Answer) -> None:
    """Write what the experiment on a cell yields into its entry: per attack, the
    reconstruction's .npy, then the record, then the row and the printed line. The
    training and the ranks go to disk with the next attack."""
    stem, shape = file_stem(cell.model, cell.image, cell.defence), cell.image.shape
    entry = folder.entry(cell.key)
    if entry is None:
        target = None  # a captured gradient with no image named: nothing to score against
        if cell.image.x is not None:
            pixels = to_image(cell.image.x, cell.image.normalize).astype(np.float32)
            target = {"npy": folder.save_array(f"{stem}_target.npy", pixels)}
        captured = {} if cell.image.captured is None else {"gradient": cell.image.captured.name}
        entry = folder.add({"model": recorded_model(cell.model), "architecture": model_text(cell.model, shape),
                            "unknowns": layer_unknowns(cell.model, shape),
                            "image": cell.image.name, "defence": {"spec": cell.defence.spec},
                            "label": cell.image.label, "target": target} | captured)
    if isinstance(event, Defended):  # to disk with the next attack
        defence = entry["defence"]
        defence |= event.info
        if "rank_deficiency" in event.info:
            defence |= indices_of(event.info["rank_deficiency"], entry["unknowns"])
        return
    if isinstance(event, Training):
        entry["training"] = event.info
        if event.info["diverged"]:
            warn(f"{cell.model} on {cell.image.name}: training diverged (last loss {event.info['final_loss']}); "
                 "recorded as diverged")
        return
    if isinstance(event, Skipped):
        entry.setdefault("skipped", {}).update(dict.fromkeys(event.attacks, event.why))
        folder.save()
        warn(f"{cell.model} on {cell.image.name}: {', '.join(event.attacks)} skipped: {event.why}")
        return
    if isinstance(event, RankAnalysis) or (event.attack == "rgap" and "rank_deficiency" not in entry
                                           and cell.defence == NO_DEFENCE):
        deficiency = event.deficiency if isinstance(event, RankAnalysis) else event.entry["rank_deficiency"]
        entry["rank_deficiency"] = deficiency
        entry |= indices_of(deficiency, entry["unknowns"])
    if isinstance(event, RankAnalysis):
        return
    npy = folder.save_array(f"{stem}_{event.attack}.npy", event.recon.astype(np.float32))
    e = entry.setdefault("attacks", {})[event.attack] = event.entry | {"npy": npy}
    not_finite = folder.finished(entry, event.attack)
    ssim = "nan" if e["ssim"] is None or not math.isfinite(e["ssim"]) else f"{e['ssim']:.3f}"
    shown = "" if cell.defence == NO_DEFENCE else f"{cell.defence.spec:13s} "  # which cell of the grid
    scores = (f"PSNR {report.format_psnr(e['psnr'], 2):>9s}  SSIM {ssim}" if entry["target"] is not None
              else "not scored (no target)")
    wrong = {True: "", False: " (wrong)", None: ""}[e["label_correct"]]
    say(f"{entry['model']:9s} {cell.image.name:18s} {shown}{ATTACKS[event.attack].shown:9s}  "
        f"{scores}  label {e['label']}{wrong}  {e['seconds']:6.1f} s"
        + (f"  (not finite, recorded as null: {', '.join(not_finite)})" if not_finite else ""))


def flat_config(exp: Experiment, settings: AttackSettings, run: sweeps.RunSettings) -> dict:
    """results.json's `config`: every setting of the run, one flat dict (the attacker's
    knowledge of a defence is the experiment's, per cell: not a setting)."""
    method = {k: v for k, v in dataclasses.asdict(settings).items() if k != "zeros_are_missing"}
    config = dataclasses.asdict(exp) | method | dataclasses.asdict(run)
    config["models"] = [recorded_model(m) for m in exp.models]  # a module by its content, not its folder
    if not exp.image_files and exp.gradient is None:  # --label is the --image files' class (or a captured
        config["label"] = None  # gradient's); the data's images carry their own
    return config


RECORD = sweeps.Record(
    key=entry_key, parts="attacks", columns=CSV_COLUMNS, row=row, is_entry=is_entry, upgrade=upgraded,
    upgrade_key=upgraded_key,
    defaults=flat_config(Experiment(), AttackSettings(), sweeps.RunSettings()),
    may_differ=frozenset({"data", "verbose", "compile", "device",  # the files' paths: grid.json holds the images
                          "image_files", "gradient", "weights"}),  # and the gradient themselves, by name and hash,
    # config the weights (weights_name) and the models (a module file's FILE.py:NAME@HASH)
    program="hybrid.py", cells_are="(model, image, defence) cells", explain=lambda *a: config_change(*a))


def config_change(key: str, before: dict, now: dict) -> str | None:
    """Why a resume or a merge is refused, where a file named by its content changed: the
    file, in words (None: sweeps.py says 'key old -> new')."""
    if key == "weights_name":
        if before.get(key) is None and before.get("weights") is not None:
            return (f"its --weights {printable(str(before['weights']), 80)} were recorded by path alone (an older "
                    "version), so they cannot be checked to be these")
        return f"its --weights file was {before.get(key)}, this command's is {now.get(key)} (named by content)"
    if key == "models" and isinstance(before.get(key), list):
        old = {m["file"] + ":" + m["name"]: m["hash"] for m in map(RECORDED_MODULE.fullmatch, before[key]) if m}
        changed = [f"{name} (its content was {old[name]}, it is {m['hash']})"
                   for m in map(RECORDED_MODULE.fullmatch, now[key]) if m
                   and old.get(name := m["file"] + ":" + m["name"], m["hash"]) != m["hash"]]
        if changed:
            return f"the module file {changed[0]} has changed since"
    return None


def run_metadata(exp: Experiment, settings: AttackSettings, run: sweeps.RunSettings, argv: list[str]) -> dict:
    """results.json's header: the config, library versions, device and command line. The
    versions are the installed distributions' (importlib.metadata), read without importing
    them: a torchvision that does not match torch fails on import, and must not stop a run
    that never uses it."""
    import importlib.metadata

    name = torch.cuda.get_device_name() if exp.device == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    versions = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "numpy", "scipy", "scikit-image", "matplotlib"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"config": flat_config(exp, settings, run), "versions": versions, "commit": code_commit(),
            "device": exp.device, "device_name": name, "command": shlex.join(["python", "hybrid.py", *argv])}


def code_commit() -> str | None:
    """`git describe --always --dirty` of the checkout this file runs from (each stretch of a
    run records it); None outside a git checkout, or without git."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def paper_sweep(exp: Experiment, settings: AttackSettings, run: sweeps.RunSettings, argv: list[str],
                images: list[PrivateImage]) -> sweeps.Sweep:
    """The experiment over every model against every image, as sweeps.run takes it."""
    # Image by image, every model on each: a long study stopped part-way (or a shard of it)
    # holds whole images, a smaller study of its own, rather than some of the models.
    defences = [parse_defence(spec) for spec in exp.defences]
    cells = [Cell(name, image, exp.attacks, False, defence)
             for image in images for name in exp.models for defence in defences]
    name = model_stem(exp.models[0]) if len(exp.models) == 1 else "grid"  # a string's commas make no folder name
    return sweeps.Sweep(RECORD, name, run_metadata(exp, settings, run, argv), cells, left_to_do,
                        functools.partial(run_cells, exp, settings), record_event, finish,
                        functools.partial(configure_process, exp.device, run.threads, settings.verbose),
                        functools.partial(cells_together, settings))


# =============================================================================
# The command line: the parser from the settings' declarations, the checks that need more
# than one value, and main
# =============================================================================


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, in main's words (argparse prints usage too)
        raise UserError(message)


def seed_value(text: str) -> int:
    value = sweeps.at_least(0, "a seed")(text)
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


def build_parser(only_given: bool = False) -> Parser:
    """Every flag, from the settings' declarations (Experiment, AttackSettings,
    sweeps.RunSettings) and the modes below. No flag has a default here: the defaults are the
    dataclasses', so that a parser whose missing flags are left out (only_given) tells which
    flags a command gave."""
    p = Parser(prog="hybrid.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,  # a typo is no other flag
               formatter_class=argparse.RawDescriptionHelpFormatter,
               argument_default=argparse.SUPPRESS if only_given else None)
    sweeps.add_settings(p.add_argument_group("what is attacked"), Experiment)
    a = p.add_argument_group("the attacks (defaults: the paper's settings)")
    a.add_argument("--quick", action="store_true", help="smoke-test iteration counts; flags given still win")
    sweeps.add_settings(a, AttackSettings)
    o = p.add_argument_group("what to do instead of attacking")
    o.add_argument("--analyse", action="store_true", help="print rank deficiencies and the security index")
    o.add_argument("--list-models", action="store_true", help="list the models")
    sweeps.add_arguments(p, OUTPUT_PATH)
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """The command line, and the settings it gave (for check_combinations)."""
    return build_parser().parse_args(argv), set(vars(build_parser(only_given=True).parse_args(argv)))


# Modes and what they keep: any other flag given with one has no effect. --analyse keeps the
# settings that are not the attacks' (its ranks need no attack) and --threads.
MODES = {"merge": {"merge", "output", "partial"}, "list_models": {"list_models"}}
RUN_FLAGS = {"resume", "shard", "jobs", "output", "partial"}  # what --analyse, which writes no folder, ignores


def check_combinations(args: argparse.Namespace, given: set[str]) -> None:
    """A flag that would be ignored, or that contradicts another, is one line and exit 2:
    a setting given must be a setting used (results.json records them all). What each
    setting needs is its declaration's `meta`, and which attacks read it ATTACKS'."""
    fields = {f.name: f for cls in (Experiment, AttackSettings, sweeps.RunSettings) for f in sweeps.flags_of(cls)}
    flag = lambda dest: sweeps.flag_name(fields[dest]) if dest in fields else "--" + dest.replace("_", "-")  # noqa: E731
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


def parse_image_indices(tokens: list[str]) -> list[int]:
    """'3', '0-99', '0-9,20,31' (several tokens allowed) -> image indices, in order, once each."""
    out = []
    for token in ",".join(tokens).split(","):
        first, dash, last = token.strip().partition("-")
        try:
            lo = int(first)
            hi = int(last) if dash else lo
        except ValueError:
            raise UserError(f"--index: '{token.strip()}' is not an index or a range such as 0-99") from None
        if hi < lo:
            raise UserError(f"--index: the range '{token.strip()}' is empty")
        if hi >= MAX_IMAGES:  # checked before a range the size of the request is made
            raise UserError(f"--index {hi} is out of range: no source holds more than {MAX_IMAGES} images "
                            f"(MNIST's training set, 0-{MAX_IMAGES - 1})")
        out.extend(range(lo, hi + 1))
    return list(dict.fromkeys(out))


def expand_models(names: list[str], shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> list[str]:
    """'all' -> every model; a shell pattern (fnmatch) -> the models it matches, in the
    zoo's order; random:N -> N draws for inputs of `shape`; a name stays. Each model once,
    in the order given."""
    out = []
    for name in names:
        if name == "all" or any(c in name for c in "*?["):
            matches = list(MODELS) if name == "all" else [m for m in MODELS if fnmatch.fnmatchcase(m, name)]
            if not matches:
                raise UserError(f"--model '{name}' matches no model (--list-models lists the {len(MODELS)} models)")
            out += matches
        elif name in MODELS:
            out.append(name)
        elif name.startswith("random:"):
            m = re.fullmatch(r"random:(\d+)(?:@(\d+))?", name)
            if m is None or int(m[1]) == 0:
                raise UserError(f"--model '{name}': expected random:N or random:N@SEED, N at least 1")
            out += random_architectures(int(m[1]), int(m[2]) if m[2] else RANDOM_SEED, shape)
        elif "-" not in name and not is_model_file(name):
            raise UserError(f"unknown model '{name}' (--list-models lists the {len(MODELS)} models; or give an "
                            "architecture string, e.g. 8k3s1p0-tanh,fc-id, or your module as PATH.py:NAME)")
        else:
            canonical = canonical_model(name, shape)  # checked now
            if canonical != name and not is_model_file(name):
                say(f"--model {printable(name, 80)} is {canonical}: run as that")
            out.append(canonical)
    if len(set(out)) < len(out):
        say("models given twice (in whatever spelling) run once")
    return list(dict.fromkeys(out))


def canonical_model(name: str, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> str:
    """A model's one name: a zoo name, or an architecture string in its canonical spelling,
    which is the zoo's name where it is a zoo model's string (checked on inputs of `shape`)."""
    if name in MODELS:
        return name
    if is_model_file(name):  # PATH.py:NAME@HASH: the run loads this content alone
        hashed = hashed_model_file(name)
        module_layout(hashed, shape)  # read now: a module the attacks cannot take is refused before any folder
        return hashed
    text = str(architecture(name, shape))  # parsed once a process: every entry of a record read asks
    return next((m for m, t in MODELS.items() if t == text), text)


def canonical_defences(specs: list[str]) -> list[str]:
    """The specs in their canonical spelling, each once: two spellings of one defence are one
    cell of the grid, and the record names it so (a resume and a merge agree on it)."""
    out = [parse_defence(spec).spec for spec in specs]
    if len(set(out)) < len(out):
        say("defences given twice (in whatever spelling) run once")
    for spec, canonical in dict.fromkeys(zip(specs, out)):
        if spec != canonical and spec.strip() != canonical:
            say(f"--defence {printable(spec, 60)} is {canonical}")
    return list(dict.fromkeys(out))


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


def quick_iterations() -> dict[str, int]:
    """--quick's iteration counts, a smoke test's, as AttackSettings declares them."""
    return {f.name: f.metadata["quick"] for f in sweeps.flags_of(AttackSettings) if "quick" in f.metadata}


def settings_from(args: argparse.Namespace) -> tuple[Experiment, AttackSettings, sweeps.RunSettings]:
    """The command line as the three kinds of setting: the flags given, the dataclasses'
    defaults for the rest (--quick's for the iteration counts), every value checked."""
    quick = {name: n for name, n in quick_iterations().items() if args.quick and getattr(args, name) is None}
    settings = sweeps.given(AttackSettings, args, **quick)
    default = Experiment()
    shape, classes = data_format(args)
    if args.image_files and args.label is not None and args.label >= classes:
        raise UserError(f"--label {args.label} is not a class of a model with {classes} (0-{classes - 1}; "
                        "--classes K for more)")
    if args.normalize is not None:
        normalize_of(args.normalize, shape[0])  # checked now
    indices = parse_image_indices(args.image_indices) if args.image_indices else None
    captured = {}
    if args.gradient is not None:  # a captured gradient: its true image only where one is named, its label where given
        indices, captured = indices or [], {"label": args.label}
    exp = sweeps.given(Experiment, args, models=expand_models(args.models or default.models, shape),
                       input_shape=list(shape), classes=classes,
                       image_indices=default.image_indices if indices is None else indices,
                       attacks=[a for a in ATTACKS if a in (args.attacks or default.attacks)],
                       defences=canonical_defences(args.defences or default.defences),
                       device=resolve_device(args.device or default.device),
                       weights_name=None if args.weights is None else weights_content(args.weights)[1], **captured)
    if exp.gradient is not None and len(exp.models) != 1:
        raise UserError(f"--gradient is one model's gradient: give one --model, not {len(exp.models)}")
    if exp.gradient is not None and settings.true_label and exp.label is None:
        raise UserError("--true-label with --gradient needs the true label: --label K, or the image by --index")
    if settings.compile:
        check_compiler(exp.device)
    return exp, settings, sweeps.run_settings(args, OUTPUT_PATH)


def normalize_of(values: list[float], channels: int) -> tuple[tuple, tuple]:
    """--normalize's values as (mean, std) per channel or for all."""
    shown = " ".join(f"{v:g}" for v in values)
    if len(values) not in (2, 2 * channels):
        raise UserError(f"--normalize {shown}: give MEAN STD, or {channels} means then {channels} stds")
    half = len(values) // 2
    mean, std = tuple(values[:half]), tuple(values[half:])
    if not all(math.isfinite(v) for v in values) or min(std) <= 0:
        raise UserError(f"--normalize {shown}: the means must be finite and the stds above 0")
    return mean, std


def data_format(args: argparse.Namespace | Experiment) -> tuple[tuple[int, int, int], int]:
    """The models' input (C, H, W) and classes: the data's, or --input-shape's and
    --classes' for --image files, and over the data's for a captured gradient (--gradient)."""
    if args.image_files:
        shape = tuple(args.input_shape or PHOTOGRAPH_SHAPE)
        if shape[0] not in (1, 3):
            raise UserError(f"--input-shape {' '.join(map(str, shape))}: image files are made 1 channel (grayscale) "
                            "or 3 (RGB)")
        return shape, args.classes or PHOTOGRAPH_CLASSES
    source = args.source or Experiment().source
    data = DATASETS.get(dataset_of(source)[0])
    shape, classes = (data.shape, len(data.classes)) if data else (PHOTOGRAPH_SHAPE, PHOTOGRAPH_CLASSES)
    if args.gradient:
        return tuple(args.input_shape or shape), args.classes or classes
    return shape, classes


def captured_image(exp: Experiment, images: list[PrivateImage]) -> PrivateImage:
    """The one cell's image of a captured gradient (--gradient): the image named to score
    against, carrying the gradient, or none (x None). Its gradient is checked against the
    model now, before any folder."""
    if len(images) > 1:
        raise UserError(f"--gradient is one image's gradient: name one image to score against, not {len(images)}")
    captured = load_gradient(exp.gradient, tuple(exp.input_shape))
    normalize = PUBLISHED_NORMALIZE if exp.normalize is None else normalize_of(exp.normalize, exp.input_shape[0])
    if not images:
        image = PrivateImage(captured.name, None, exp.label, normalize, captured)
    elif exp.image_files:  # a file has no label of its own: --label's, where given
        image = images[0]._replace(label=exp.label, captured=captured)
    elif exp.label is not None:
        raise UserError(f"--label has no effect with --index: {images[0].name}'s label is the data's")
    else:
        image = images[0]._replace(captured=captured)
    captured_gradient(prepare_model(exp, exp.models[0], image)[0], captured)
    return image


def list_models() -> int:
    for name, text in MODELS.items():
        say(f"{name:9s} {text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if hasattr(sys.stdout, "reconfigure"):  # a path that is not UTF-8 prints escaped, not as a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    if threading.current_thread() is threading.main_thread():  # a scheduler's time limit stops the run cleanly
        signal.signal(signal.SIGTERM, sweeps.on_sigterm)
    try:
        args, given = parse_args(argv)
        check_combinations(args, given)
        if args.list_models:
            return list_models()
        if args.merge:
            sweeps.merge(args.merge, RECORD, args.output or OUTPUT_PATH, finish, args.partial)
            return 0
        exp, settings, run = settings_from(args)
        configure_process(exp.device, run.threads, settings.verbose)
        # after the settings, so that an unknown model fails before any download
        images, used = [], exp.source  # a captured gradient named with no image has none
        if exp.image_files or exp.image_indices:
            images, used = load_images(exp, analysing=args.analyse)
        if exp.normalize is not None:
            images = [normalized(image, *normalize_of(exp.normalize, exp.input_shape[0])) for image in images]
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


if __name__ == "__main__":
    sys.exit(main())

