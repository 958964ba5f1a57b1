"""The activations, one row each (ACTIVATIONS): the grammar's spelling, the module, its inverse
and derivative (what the paper's recursion needs of it), how torch.fx spells it as a call,
and the name shown. Every other file reads these rows; a new activation is one row."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from leakage.console import UserError

CLIP = 0.9999  # tanh and sigmoid outputs are clipped this close to their bounds, so that z stays finite


@dataclass(frozen=True)
class Activation:
    """One activation: the grammar spells it `spelling` (with its parameter's value after it,
    leaky0.2, where it has one), and a module of class `module` is it."""

    spelling: str
    module: type[nn.Module]
    make: Callable[[float | None], nn.Module]  # the module, from its parameter's value (None: the default)
    inverse: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # z with act(z) = a, every value finite
    derivative: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # act'(z), elementwise
    calls: tuple[str, ...] = ()  # torch.fx's names for it as a call (torch.tanh, F.tanh, x.tanh())
    from_call: Callable[[tuple, dict], nn.Module] | None = None  # the module, from such a call's other arguments
    parameter: Callable[[nn.Module], float] | None = None  # the value spelled after it, where it has one
    default: float | None = None  # that value's default, spelled by the name alone
    # in the grammar (an architecture string) and not only in describing a module: leakyA is, softplusB is not
    spelled_in_grammar: bool = False
    check: Callable[[nn.Module], str | None] = lambda act: None  # why a module of this class cannot be taken


def invert_softplus(act: nn.Softplus, a: torch.Tensor) -> torch.Tensor:
    a = (act.beta * a).clamp_min(1e-12)  # log(expm1(beta a)) / beta, written to not overflow for large a
    return (a + torch.log(-torch.expm1(-a))) / act.beta


def invert_sigmoid(act: nn.Sigmoid, a: torch.Tensor) -> torch.Tensor:
    a = a.clamp((1 - CLIP) / 2, (1 + CLIP) / 2)
    return torch.log(a / (1 - a))


def leaky_from_call(args: tuple, kwargs: dict) -> nn.Module:
    return nn.LeakyReLU(args[0] if args else kwargs.get("negative_slope", 0.01))


def softplus_from_call(args: tuple, kwargs: dict) -> nn.Module:
    beta = args[0] if args else kwargs.get("beta", 1.0)
    return nn.Softplus(beta, args[1] if len(args) > 1 else kwargs.get("threshold", 20.0))


def softplus_threshold(act: nn.Softplus) -> str | None:
    """The inverse and the derivative are softplus's own: a module that turns linear above
    another threshold is another function, not modelled here."""
    return None if act.threshold == 20 else (f"has threshold {act.threshold:g}: only softplus's own (20) is modelled, "
                                             "whose inverse and derivative the attacks use")


def leaky_slope_check(act: nn.LeakyReLU) -> str | None:
    return None if act.negative_slope > 0 else (f"is a ReLU, which cannot be inverted (slope {act.negative_slope}; "
                                                "give a slope above 0)")


ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation("tanh", nn.Tanh, lambda p: nn.Tanh(), lambda act, a: torch.atanh(a.clamp(-CLIP, CLIP)),
                       lambda act, z: 1 - torch.tanh(z) ** 2, calls=("tanh",), from_call=lambda a, k: nn.Tanh()),
    "sigmoid": Activation("sigmoid", nn.Sigmoid, lambda p: nn.Sigmoid(), invert_sigmoid,
                          lambda act, z: torch.sigmoid(z) * (1 - torch.sigmoid(z)), calls=("sigmoid",),
                          from_call=lambda a, k: nn.Sigmoid()),
    "softplus": Activation("softplus", nn.Softplus, lambda p: nn.Softplus(1.0 if p is None else p), invert_softplus,
                           lambda act, z: torch.sigmoid(act.beta * z), calls=("softplus",),
                           from_call=softplus_from_call, parameter=lambda act: act.beta, default=1.0,
                           check=softplus_threshold),
    "id": Activation("id", nn.Identity, lambda p: nn.Identity(), lambda act, a: a, lambda act, z: torch.ones_like(z)),
    "leaky": Activation("leaky", nn.LeakyReLU, lambda p: nn.LeakyReLU(0.01 if p is None else p),
                        lambda act, a: torch.where(a >= 0, a, a / act.negative_slope),
                        lambda act, z: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, act.negative_slope)),
                        calls=("leaky_relu",), from_call=leaky_from_call, parameter=lambda act: act.negative_slope,
                        default=0.01, spelled_in_grammar=True, check=leaky_slope_check),
}
SPELLING = re.compile(r"([a-z]+)(\d+\.?\d*|\.\d+)?")


def row_of(act: nn.Module) -> Activation:
    """The row of an activation module (by its class)."""
    return next(row for row in ACTIVATIONS.values() if isinstance(act, row.module))


def is_activation(module: object) -> bool:
    return any(isinstance(module, row.module) for row in ACTIVATIONS.values())


def spelling_parts(act: str) -> tuple[Activation, float | None] | None:
    """An activation's spelling as (its row, its parameter's value or None); None where no
    row spells it so."""
    m = SPELLING.fullmatch(act)
    row = ACTIVATIONS.get(m[1]) if m else None
    if row is None or (m[2] is not None and row.parameter is None):
        return None
    return row, None if m[2] is None else float(m[2])


def check_activation(act: str, where: str) -> None:
    """An activation of the grammar (an architecture string's), or a UserError naming it."""
    parts = spelling_parts(act)
    if parts is None or (parts[1] is not None and not parts[0].spelled_in_grammar):
        spelled = ", ".join(f"{r.spelling} or {r.spelling}A" if r.spelled_in_grammar else r.spelling
                            for r in ACTIVATIONS.values())
        raise UserError(f"{where}: unknown activation '{act}' ({spelled}, e.g. leaky0.2)")
    why = parts[0].check(make_activation(act))
    if why is not None:
        raise UserError(f"{where}: '{act}' {why}")


def make_activation(act: str) -> nn.Module:
    """The module an activation's spelling stands for (leaky0.2: nn.LeakyReLU(0.2))."""
    row, value = spelling_parts(act)
    return row.make(value)


def spelled(act: nn.Module) -> str:
    """An activation module in the grammar's words (its parameter after its name, where it
    is not the default): canonical, so that two spellings of one activation are one."""
    row = row_of(act)
    value = None if row.parameter is None else row.parameter(act)
    if value is None or value == row.default:
        return row.spelling
    return row.spelling + np.format_float_positional(value, trim="-")


def canonical_activation(act: str) -> str:
    """An activation as its one spelling: leaky, leaky0.01 and leaky.01 are one leaky ReLU,
    'leaky' (the default slope); another slope as a plain decimal (leaky0.2)."""
    return spelled(make_activation(act))


def shown_activation(act: str) -> str:
    """What a figure calls an activation spelled so: its name, with a slope (a leaky ReLU's,
    since its inverse divides by it, so errors grow on the way down); 'other' for none."""
    parts = spelling_parts(act)
    if parts is None:
        return "other"
    row, value = parts
    return f"{row.spelling} {value if value is not None else row.default:g}" if row.spelled_in_grammar else row.spelling


def from_call(name: str, args: tuple, kwargs: dict) -> nn.Module | None:
    """The activation module a torch.fx call stands for (torch.tanh, F.softplus(x, beta=2),
    x.sigmoid(), F.leaky_relu(x, 0.2), ...): its name and its arguments after the input;
    None where it is none of them. An in-place call (y.tanh_(), F.leaky_relu(y, inplace=True))
    computes the same function: the chain's tensor is the call's output either way."""
    name, kwargs = name.removesuffix("_") if not name.startswith("_") else name, {
        k: v for k, v in kwargs.items() if k != "inplace"}
    row = next((r for r in ACTIVATIONS.values() if name in r.calls), None)
    return None if row is None else row.from_call(args, kwargs)


def inverse_activation(act: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """z with act(z) = a; inputs outside the range are clipped so every value is finite."""
    return row_of(act).inverse(act, a)


def activation_derivative(act: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """act'(z), elementwise."""
    return row_of(act).derivative(act, z)
