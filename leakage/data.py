"""The private images: CIFAR-10 (CIFAR-100, MNIST, Fashion-MNIST), scikit-image's photographs and the
user's files, as the models' input; the input's shape and classes, and --normalize."""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import math
import os
import pickle
import re
import socket
import stat
from pathlib import Path
from typing import NamedTuple, TYPE_CHECKING

import numpy as np
import torch

from leakage.console import UserError, printable, say, warn

if TYPE_CHECKING:  # annotations alone
    from leakage.gradients import Captured
    from leakage.settings import Experiment

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
    x: torch.Tensor | None  # (B, C, H, W): (1, 3, 32, 32) for a CIFAR image; (pixels - mean) / std, in [-0.5, 0.5]
    label: int | tuple[int, ...] | None  # a batch's (--batch B): one per image, "cifar10:0+1+2+3"
    normalize: tuple = PUBLISHED_NORMALIZE  # (mean, std), per channel or one for all
    captured: Captured | None = None  # --gradient: what the client shared, read from a file

    @property
    def shape(self) -> tuple[int, int, int]:
        """The models' input (C, H, W)."""
        return tuple(self.x.shape[1:]) if self.x is not None else self.captured.shape

    @property
    def size(self) -> int:
        """The images the client trains on: 1, or a batch's B."""
        return len(self.x) if self.x is not None else self.captured.batch if self.captured is not None else 1

    @property
    def labels(self) -> list[int] | None:
        """The label of each image, a batch's or one image's."""
        return None if self.label is None else [self.label] if isinstance(self.label, int) else list(self.label)


def batched(images: list[PrivateImage], size: int) -> list[PrivateImage]:
    """--batch B: the images, B at a time in their order, each batch one PrivateImage of B
    rows named by its images ("cifar10-test:0+1+2+3"); B = 1 leaves them as they are."""
    if size == 1:
        return images
    if len(images) % size:
        raise UserError(f"--batch {size}: {len(images)} image{'s' * (len(images) > 1)} make no whole number of "
                        f"batches of {size} (give --index a multiple of {size} images)")
    out = []
    for start in range(0, len(images), size):
        group = images[start:start + size]
        sources = {image.name.partition(":")[0] for image in group}
        name = (f"{sources.pop()}:" + "+".join(image.name.partition(":")[2] for image in group) if len(sources) == 1
                else "+".join(image.name for image in group))
        out.append(PrivateImage(name, torch.cat([image.x for image in group]), tuple(i.label for i in group),
                                group[0].normalize))
    return out


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


def to_images(x: torch.Tensor, normalize: tuple = PUBLISHED_NORMALIZE) -> np.ndarray:
    """A batch in model space -> (B, H, W, C) in [0, 1], each as to_image makes it."""
    return np.stack([to_image(x[i:i + 1], normalize) for i in range(len(x))])


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
DEFAULT_SOURCE = "cifar10"  # the paper's
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


def load_training_split(source: str, image_indices: list[int], root: str,
                        download: bool = True) -> list[PrivateImage] | str:
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


def file_bytes(path: str, where: str, what: str = "") -> bytes:
    """A regular file's bytes (read_regular_file), or one UserError saying why not, after `where`."""
    try:
        return read_regular_file(path)
    except (OSError, ValueError) as e:  # a missing file, a FIFO, a device
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"{where}: cannot be read{what} ({printable(why, 200)})") from None


def saved_tensors(data: bytes, where: str, what: str) -> object:
    """What torch.save wrote to a file's bytes, loaded with weights_only=True (tensors and
    plain containers, never other objects); an empty file, a pickle of other objects or no
    pickle at all is one UserError saying so (not PyTorch's paragraph, whose advice is to
    load untrusted files unsafely)."""
    if not data:
        raise UserError(f"{where}: the file is empty (0 bytes), not {what}")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        global_ = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if global_:
            raise UserError(f"{where}: holds {printable(global_[1], 80)}, not tensors alone, and objects other "
                            "than tensors are not loaded: save torch tensors (a numpy array: torch.from_numpy(a))"
                            ) from None
        why = "not a file torch.save wrote"
    except Exception as e:  # a truncated zip, a file of another program
        why = f"{type(e).__name__}: {next((line for line in str(e).splitlines() if line.strip()), '')}"
    raise UserError(f"{where}: cannot be read as {what} ({printable(why, 160)})") from None


def real_values(tensor: torch.Tensor, where: str, what: str) -> torch.Tensor:
    """A saved tensor as the attacks take it: dense, and real floating point. A sparse tensor
    is made dense (the same values); a complex one is refused, since no real model's weights
    or gradient are complex and dropping the imaginary part would attack another tensor; an
    integer or bool one is read as float32 (exact for the values it holds, but not what a
    float model shares: `whole_numbers` says so); NaN or infinity is refused, naming `what`."""
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    if tensor.is_complex():
        raise UserError(f"{where}: '{what}' is complex ({tensor.dtype}); a model's weights and gradient are real")
    if not torch.isfinite(tensor.float()).all():
        raise UserError(f"{where}: '{what}' holds values that are not finite")
    return tensor if tensor.is_floating_point() else tensor.float()


def whole_numbers(tensors: dict[str, torch.Tensor], where: str) -> None:
    """One line where saved tensors hold integers or bools, not floats (read as float32)."""
    named = [(name, t) for name, t in tensors.items() if isinstance(t, torch.Tensor) and not (
        t.is_floating_point() or t.is_complex())]
    if named:
        kinds = sorted({str(t.dtype).removeprefix("torch.") for _, t in named})
        warn(f"{where}: {len(named)} of its tensors ('{named[0][0]}'{', ...' * (len(named) > 1)}) hold "
             f"{' and '.join(kinds)} values, not floats: read as float32, which no float model shares")


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
        images = load_training_split(exp.source, exp.image_indices, exp.data, download=not analysing)
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


def parse_image_indices(tokens: list[str], source: str | None = None) -> list[int]:
    """'3', '0-99', '0-9,20,31' (several tokens allowed) -> image indices, in order, once each;
    each within `source` where it is given (else within the largest source)."""
    limit, holds = source_size(source) if source else (MAX_IMAGES, f"no source holds more than {MAX_IMAGES} images "
                                                                   "(MNIST's training set")
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
        if hi >= limit:  # checked before a range the size of the request is made
            raise UserError(f"--index {hi} is out of range: {holds}, 0-{limit - 1})")
        out.extend(range(lo, hi + 1))
    return list(dict.fromkeys(out))


def source_size(source: str) -> tuple[int, str]:
    """How many images --source holds, and how a message says so (up to its range)."""
    if source == "samples":
        return len(PHOTOGRAPHS), f"--source samples holds {len(PHOTOGRAPHS)} photographs (scikit-image's"
    name, training = dataset_of(source)
    data = DATASETS[name]
    n = data.sizes[0 if training else 1]
    return n, f"--source {source} holds {n} images ({data.shown}'s {'training' if training else 'test'} set"


def normalize_of(values: list[float], channels: int) -> tuple[tuple, tuple]:
    """--normalize's values as (mean, std) per channel or for all."""
    shown = " ".join(f"{v:g}" for v in values)
    if len(values) not in (2, 2 * channels):
        raise UserError(f"--normalize {shown}: give MEAN STD, or {channels} means then {channels} stds")
    half = len(values) // 2
    mean, std = tuple(values[:half]), tuple(values[half:])
    if not all(math.isfinite(v) for v in values) or min(std) <= 0:
        raise UserError(f"--normalize {shown}: the means must be finite and the stds above 0")
    mapped, lost = pixels_mapped(mean, std)
    if lost > 0.5 / 255 or mapped > 1e6:
        why = (f"pixels mapped as far as {mapped:.3g}, where a model's input is of order 1" if lost <= 0.5 / 255 else
               f"8-bit pixels come back off by up to {lost:.3g}" if math.isfinite(lost) else "the pixels are lost")
        raise UserError(f"--normalize {shown}: float32 cannot carry the image so mapped ({why}); give the mean and "
                        "std of [0, 1] pixels")
    return mean, std


def pixels_mapped(mean: tuple, std: tuple) -> tuple[float, float]:
    """The 256 pixel levels through (mean, std) in float32, as the model gets them: how far
    they reach, and how far they come back from where they were. A std of 1e300 is infinite
    in float32 and maps every pixel to 0; a mean of 1e10 leaves the pixel no bits; a std of
    1e-300 is 0. Half a level off is an image that is not the one named (checked up front,
    as a defence's strength is)."""
    levels = torch.linspace(0, 1, 256, dtype=torch.float64).view(1, -1)
    m, s = (torch.tensor(v, dtype=torch.float64).view(-1, 1) for v in (mean, std))
    mapped = (levels.float() - m.float()) / s.float()
    back = mapped.double() * s + m
    return (float(mapped.abs().nan_to_num(math.inf, math.inf).max()),
            float((back - levels).abs().nan_to_num(math.inf, math.inf).max()))


MAX_IMAGE_GIB = 0.25  # one input image in float32; ImageNet's 3x224x224 is 0.0006 GiB


def data_format(args: argparse.Namespace | Experiment) -> tuple[tuple[int, int, int], int]:
    """The models' input (C, H, W) and classes: the data's, or --input-shape's and
    --classes' for --image files, and over the data's for a captured gradient (--gradient)."""
    if args.image_files:
        shape = sized(tuple(args.input_shape or PHOTOGRAPH_SHAPE), "--input-shape")
        if shape[0] not in (1, 3):
            raise UserError(f"--input-shape {' '.join(map(str, shape))}: image files are made 1 channel (grayscale) "
                            "or 3 (RGB)")
        return shape, args.classes or PHOTOGRAPH_CLASSES
    source = args.source or DEFAULT_SOURCE
    data = DATASETS.get(dataset_of(source)[0])
    shape, classes = (data.shape, len(data.classes)) if data else (PHOTOGRAPH_SHAPE, PHOTOGRAPH_CLASSES)
    if args.gradient:
        return sized(tuple(args.input_shape or shape), "--input-shape", scored=False), args.classes or classes
    return shape, classes


def sized(shape: tuple[int, int, int], where: str, scored: bool = True) -> tuple[int, int, int]:
    """`shape`, where one image of it fits in MAX_IMAGE_GIB in float32 and, where it is
    `scored`, SSIM's 7x7 window fits in it; else one UserError (a 100000x100000 image would
    ask for 120 GB before any check of the model saw it; a 2x2 one would fail in every cell)."""
    gib, shown = 4 * math.prod(shape) / 2**30, f"{where} {' '.join(map(str, shape))}"
    if gib > MAX_IMAGE_GIB:
        raise UserError(f"{shown}: one image would take {gib:.3g} GiB in float32 (the limit is {MAX_IMAGE_GIB:g} GiB, "
                        "67 million values)")
    if scored and min(shape[1:]) < 7:
        raise UserError(f"{shown}: SSIM scores images of at least 7x7 (its window)")
    return shape
