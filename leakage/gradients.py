"""The gradient an attack is handed: the client's, computed, or one captured elsewhere (--gradient)."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, TYPE_CHECKING

import torch

from leakage.console import UserError, printable
from leakage.data import content_name, file_bytes, saved_tensors
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


def load_gradient(path: str, shape: tuple[int, int, int]) -> Captured:
    """--gradient FILE.pt: `[p.grad for p in model.parameters()]` or `{n: p.grad for n, p in
    model.named_parameters()}` as torch.save wrote it; anything else a UserError."""
    where = f"--gradient {printable(path, 200)}"
    data = file_bytes(path, where, " as saved tensors")
    tensors = saved_tensors(data, where, "saved tensors")
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
