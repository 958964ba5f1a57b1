"""Trained weights (--train-steps): SGD on mini-batches that never include the attacked image."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from leakage.console import progress
from leakage.data import (
    DATASETS, FOOLBOX_IMAGES, LUMINANCE, PHOTOGRAPHS, PHOTOGRAPH_CLASSES, PHOTOGRAPH_SHAPE, PUBLISHED_NORMALIZE,
    all_photographs, dataset_of, foolbox_test_set, normalized
)

if TYPE_CHECKING:  # annotations alone
    from leakage.data import PrivateImage
    from leakage.models import Net

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
def photograph_crops(exclude: str | tuple[str, ...], seed: int,
                     shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> tuple[torch.Tensor, torch.Tensor, str]:
    """random_crops of the bundled photographs other than `exclude` (one name, or a batch's),
    and their names."""
    import skimage.data

    excluded = (exclude,) if isinstance(exclude, str) else exclude
    sources = [(name, torch.as_tensor(load(skimage.data)).permute(2, 0, 1)[None] / 255.0, label)
               for name, load, label in PHOTOGRAPHS if name not in excluded]
    return *random_crops(sources, seed, shape), " ".join(name for name, _, _ in sources)


@functools.cache
def crops_of_test_set(name: str, exclude: int | tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """random_crops of foolbox's test images of a dataset other than the attacked one (or
    the attacked batch's)."""
    excluded = (exclude,) if isinstance(exclude, int) else exclude
    sources = [(i, torch.as_tensor(pixels).permute(2, 0, 1)[None] / 255.0, label)
               for i, (pixels, label) in enumerate(foolbox_test_set(name)) if i not in excluded]
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
    """Images, labels and a description of the training set for a model attacked on `image`
    (a client's batch, cifar10:0+1+2+3: on all but its images)."""
    source, _, key = image.name.partition(":")
    keys = key.split("+")  # one image's, or a batch's (data.batched)
    less = f"image {key}" if len(keys) == 1 else f"images {', '.join(keys)}"
    if source in DATASETS:
        x, y = training_set(source, data_root)
        keep = ~torch.isin(torch.arange(len(x)), torch.tensor([int(k) for k in keys]))  # all but the attacked
        return x[keep], y[keep], f"{DATASETS[source].shown} training set less {less}"
    name, train = dataset_of(source)
    if name in DATASETS and not train:
        shown = DATASETS[name].shown
        try:
            x, y = training_set(name, data_root)  # the attacked test images are not among them
            return x, y, f"{shown} training set"
        except (OSError, RuntimeError):  # offline: the other test images that foolbox ships
            x, y = crops_of_test_set(name, int(key) if len(keys) == 1 else tuple(int(k) for k in keys), seed)
            return x, y, f"{CROP_POOL} crops of {shown} test images 0-{FOOLBOX_IMAGES - 1} (foolbox's) less {less}"
    shape = tuple(image.x.shape[1:])
    exclude = (key if len(keys) == 1 else tuple(keys)) if source == "samples" else bundled_twin(image)
    x, y, names = photograph_crops(exclude, seed, shape)
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
