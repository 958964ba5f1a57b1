"""The gradient an attack is handed: the client's, computed, or one captured elsewhere (--gradient)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from leakage.console import UserError, printable
from leakage.data import content_name, file_bytes, real_values, saved_tensors, to_image, whole_numbers
from leakage.paper import client_gradient

if TYPE_CHECKING:  # annotations alone
    from leakage.data import PrivateImage
    from leakage.models import Net

class Captured(NamedTuple):
    """A gradient a client shared, captured elsewhere (--gradient FILE.pt): its tensors as the
    file holds them, and the input (C, H, W) it was computed on."""

    name: str  # "gradient:FILE@HASH": the file's name and the first 10 hex digits of its bytes' SHA-256
    where: str  # as a message names it: "--gradient FILE"
    tensors: tuple | dict  # in model.parameters() order, or by parameter name (None: a parameter unused)
    shape: tuple[int, int, int]
    batch: int = 1  # the images it is the mean gradient of (--batch)


def load_gradient(path: str, shape: tuple[int, int, int], batch: int = 1) -> Captured:
    """--gradient FILE.pt: `[p.grad for p in model.parameters()]` or `{n: p.grad for n, p in
    model.named_parameters()}` as torch.save wrote it; anything else a UserError."""
    where = f"--gradient {printable(path, 200)}"
    data = file_bytes(path, where, " as saved tensors")
    tensors = saved_tensors(data, where, "saved tensors")
    name = "gradient:" + content_name(printable(Path(path).name, 60), data)
    return as_captured(tensors, name, where, shape, batch)


def as_captured(tensors: object, name: str, where: str, shape: tuple[int, int, int], batch: int = 1) -> Captured:
    """A list (or tuple) of tensors or a dict of them by name, as a Captured; anything else a
    UserError."""
    is_grad = lambda t: t is None or isinstance(t, torch.Tensor)  # noqa: E731  (an unused parameter's grad is None)
    if isinstance(tensors, (list, tuple)) and tensors and all(map(is_grad, tensors)):
        tensors = tuple(tensors)
    elif not (isinstance(tensors, dict) and tensors and all(isinstance(k, str) and is_grad(v)
                                                            for k, v in tensors.items())):
        raise UserError(f"{where}: holds a {type(tensors).__name__}, not a gradient: a list of tensors in "
                        "model.parameters() order, or a dict of them by parameter name")
    return Captured(name, where, tensors, tuple(int(n) for n in shape), batch)


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
    whole_numbers(by_name, where)
    out = []
    for name, p in zip(model.names, model.parameters()):
        g = by_name.get(name)
        if g is None:
            raise UserError(f"{where}: has no gradient for '{name}'")
        if g.shape != p.shape:
            raise UserError(f"{where}: '{name}' is {tuple(g.shape)}, the model's {tuple(p.shape)}")
        out.append(real_values(g.detach(), where, name).to(p.device, p.dtype))
    if not any(g.any() for g in out):
        raise UserError(f"{where}: is exactly zero, so it carries nothing to attack")
    return out


def shared_gradient(model: Net, image: PrivateImage, device: str) -> list[torch.Tensor]:
    """What the client shares on `image`: the gradient captured (--gradient), matched to the
    model's parameters, or the one it computes (client_gradient)."""
    if image.captured is not None:
        return captured_gradient(model, image.captured)
    return client_gradient(model, image.x.to(device), image.label)


# -- What a captured gradient looks like: one image's cross-entropy gradient has fingerprints --
# The output layer z = W a + b of one image, under cross-entropy, has gb = softmax(z) - onehot(y)
# and gW = gb a^T (paper, Sec. 3; iDLG). So gb sums to zero, has exactly one negative entry, and
# its norm is at most sqrt(2); gW has rank one. A batch's mean keeps the sum but has a negative
# entry per distinct label, and gW of rank up to B; the weights file itself breaks the sum.
# Measured on DLG's LeNet (sigmoid, uniform(-0.5, 0.5)), 5 draws each: sigma_2 / sigma_1 of gW is
# at most 1.5e-8 for one image in float32, 0.28 to 0.91 for batches of 2 to 8. An update of 5
# local SGD steps on one image, divided by the learning rate, can keep these fingerprints: 7e-5
# to 2e-2 at lr 0.01, but 1e-8 to 1e-7 at lr 0.1 and 1 (the first step's gradient dominates),
# so such an update is not always told from a gradient.
RANK_ONE = 1e-4  # sigma_2 / sigma_1 above this: not rank one
ZERO_SUM = 1e-3  # |sum gb| / sum |gb| above this: not a softmax's difference from a one-hot


def fingerprint(model: nn.Module, grads: list[torch.Tensor], batch: int = 1) -> str | None:
    """What a gradient given as one image's (or, with batch B, as a batch's) looks like
    instead, in words, or None where it has one image's fingerprints (above; a batch's keep
    the sum, and have at most B negative entries)."""
    params = list(model.parameters())
    if len(grads) == len(params) and all(g.shape == p.shape for g, p in zip(grads, params)):
        close = F.cosine_similarity(torch.cat([g.flatten() for g in grads]).double(),
                                    torch.cat([p.detach().flatten() for p in params]).double(), dim=0)
        if close > 0.99:
            return f"it is the model's own parameters (cosine {close:.4f}), not their gradient: the weights file?"
    gb = grads[model.bias_at].double()
    gw = grads[model.bias_at - 1].double() if model.bias_at != 0 else None
    if not gb.any() and any(g.any() for g in grads):
        return "its output bias gradient is exactly zero, and the rest is not: zeroed (the label cannot be read)"
    if gw is not None and gw.dim() == 2 and gb.any() and not gw.any():
        return "its output weight gradient is exactly zero, and its bias gradient is not: zeroed?"
    if gb.abs().sum() > 0 and abs(gb.sum()) > ZERO_SUM * gb.abs().sum():
        return (f"its output bias gradient sums to {gb.sum():.3g}, where one image's cross-entropy gradient sums "
                "to 0: not a cross-entropy gradient of these weights (parameters, or an update?)")
    negative = int((gb < 0).sum())
    if negative > batch:
        return (f"it looks like the gradient of a batch of at least {negative} images ({negative} entries of its "
                "output bias gradient are negative; one image's has one)")
    if batch > 1:
        return None
    if gw is not None and gw.dim() == 2 and gw.shape[0] == gb.shape[0]:  # gW = gb a^T: its columns lie along gb
        off = (gw - torch.outer(gb, gb @ gw) / gb.square().sum()).norm() / gw.norm()
        if off > RANK_ONE:
            return (f"its output weight gradient does not lie along its bias gradient ({off:.2g} of it off; one "
                    "image's gW = gb a^T lies wholly along gb): a batch, an update, or tensors out of order")
    if gw is not None and gw.dim() == 2 and min(gw.shape) > 1:
        s = torch.linalg.svdvals(gw)
        if s[0] > 0 and s[1] / s[0] > RANK_ONE:
            return (f"its output weight gradient has rank above one (sigma_2 / sigma_1 = {s[1] / s[0]:.2g}; one "
                    "image's is about 1e-7): a batch, or an update of several local steps")
    if gb.norm() > math.sqrt(2) * (1 + 1e-4):
        return (f"its output bias gradient's norm is {gb.norm():.3g}, and one image's is at most sqrt(2): a sum over "
                "a batch, or a scaled gradient")
    return None


# What --normalize a captured gradient was computed under, where the true image is named: the
# published code's pixels - 0.5, torchvision's [0, 1], [-1, 1], and CIFAR-10's and ImageNet's
# statistics, the spaces users' capture code feeds (DLG's own code feeds [0, 1]).
PIXEL_SPACES = {"0.5 1": ((0.5,), (1.0,)), "0 1": ((0.0,), (1.0,)), "0.5 0.5": ((0.5,), (0.5,)),
                "0.4914 0.4822 0.4465 0.2470 0.2435 0.2616": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                "0.485 0.456 0.406 0.229 0.224 0.225": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


# What the fingerprints cannot see, R-GAP's systems can: a gradient of other weights of the
# same shapes. Through the weights given, one image's gradient makes the topmost
# convolution's system hold to float rounding; measured on cnn2_c1, cnn3_c1, cnn4_c2, lenet
# and cnn6d (one image each): 6e-8 to 2e-7 for the gradient itself, 1e-4 to 5e-2 for the
# gradient of the same weights one SGD step before (lr 0.001 to 0.1), 3e-3 to 0.9 for another
# draw of the model. Lower layers inherit the error of what is solved above them, so only
# the topmost is read.
CONSISTENT = 1e-5  # the topmost system's relative residual above which the weights are doubted


def inconsistency(residual: list[float | None] | None) -> str | None:
    """In words, where R-GAP's topmost system (Recovered.residual) does not hold at its
    least-squares solution as one image's gradient through these weights makes it hold."""
    top = next((r for r in reversed(residual or []) if r is not None), None)
    if top is None or top <= CONSISTENT:
        return None
    return (f"R-GAP's topmost system does not hold at its solution (relative residual {top:.1e}, where one image's "
            "gradient through these weights leaves about 1e-7): a gradient of other weights (another model's, or "
            "these a step stale?), or a defended one")


def pixel_space_hint(model: nn.Module, image: PrivateImage, grads: list[torch.Tensor]) -> str | None:
    """Where the true image is named with its label, the gradient recomputed from it: None
    where it matches under the given --normalize (cosine above 0.99), or where no other space
    does better; otherwise the --normalize that reproduces it, in one line."""
    if image.x is None or image.label is None or len(image.x) > 1:  # one image's (a batch: not yet)
        return None
    pixels = torch.as_tensor(to_image(image.x, image.normalize), dtype=torch.float32).permute(2, 0, 1)[None]

    def agreement(normalize: tuple) -> float:
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in normalize)
        ours = client_gradient(model, ((pixels - mean) / std).to(grads[0].device), image.label)
        return float(F.cosine_similarity(torch.cat([g.flatten() for g in ours]),
                                         torch.cat([g.flatten() for g in grads]), dim=0))
    if agreement(image.normalize) > 0.99:
        return None
    channels = image.shape[0]
    fits = {text: agreement(n) for text, n in PIXEL_SPACES.items() if len(n[0]) in (1, channels)}
    best = max(fits, key=fits.get, default=None)
    if best is None or fits[best] < 0.99:
        return None
    return (f"the named image gives this gradient under --normalize {best} (cosine {fits[best]:.4f}), not under the "
            "--normalize given: the attacks would work in the wrong pixel space")
