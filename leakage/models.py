"""The models: the published code's zoo as architecture strings, the grammar that reads them,
random:N, the Net they build, and weights (a state_dict file, or --init)."""
from __future__ import annotations

import argparse
import functools
import math
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from leakage.activations import canonical_activation, check_activation, make_activation
from leakage.console import UserError, printable
from leakage.data import (
    PHOTOGRAPH_CLASSES, PHOTOGRAPH_SHAPE, content_name, file_bytes, real_values, saved_tensors, whole_numbers)
from leakage.runtime import PUBLISHED_SEED, seed_everything

# An architecture is one string: convolutions OUTkKsSpP[b]-ACT, comma-separated, then
# fc-ACT. OUT output channels, kernel K, stride S, zero padding P, b: the convolution has a
# bias; ACT a row of activations.ACTIVATIONS: tanh, sigmoid, softplus, id, leaky (slope 0.01)
# or leakyA (slope A). Input channels follow from the layer before (the data's first), the
# input is the data's (3x32x32 for CIFAR, 1x28x28 for MNIST), and the fc layer has a bias and
# one output per class. This grammar is the interface: scripts rely on it.
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
RANDOM_ACTIVATIONS = ("tanh", "sigmoid", "softplus", "id", "leaky")  # frozen: a new row draws nothing new
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
                 f"{rng.choice(RANDOM_ACTIVATIONS)}" for _ in range(rng.integers(1, 5))]
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
        self.bias_at = -1  # the output layer's bias, among the parameters: its gradient gives the label away

    @property
    def classes(self) -> int:
        return self.layers[-1].out_features

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Layers start..L-1: f_{l:} of the paper when start = l."""
        for layer, act in zip(self.layers[start:], self.acts[start:]):
            if isinstance(layer, nn.Linear):
                x = x.flatten(1)
            x = act(layer(x))
        return x


def build_net(name: str, seed: int = PUBLISHED_SEED, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE,
              classes: int = PHOTOGRAPH_CLASSES, weights: str | None = None, weights_name: str | None = None) -> Net:
    """A zoo model or an architecture string for inputs of `shape` and `classes` classes,
    initialised as published: seed, then PyTorch's default init, layer by layer (so a zoo
    model's string gives its weights). `weights`: a state_dict file, which must still be
    `weights_name` (content_name) where given. Any model by name: modules.build_model."""
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
    data = file_bytes(path, f"--weights {printable(path, 200)}")
    return data, content_name(printable(Path(path).name, 60), data)


def load_weights(model: nn.Module, path: str, name: str | None = None) -> None:
    """A state_dict from `path` into `model`, every tensor in place (strict): a key or a shape
    that does not match is a UserError naming it; so is a file that is no longer `name`, the
    content the run began with (an edit between cells, or between a stop and --resume)."""
    where = f"--weights {printable(path, 200)}"
    data, now = weights_content(path)
    if name is not None and now != name:
        raise UserError(f"{where}: the file has changed since the run began (it was {name}, it is {now})")
    state = saved_tensors(data, where, "a state_dict")
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
    whole_numbers({key: value for key, value in state.items() if own[key].is_floating_point()}, where)
    model.load_state_dict({key: real_values(value, where, key) if own[key].is_floating_point() else value
                           for key, value in state.items()})


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


def by_layer(model: Net, grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """A per-parameter list (the shared gradient) split by layer: [[gW_0 (, gb_0)], ..., [gW_fc, gb_fc]]."""
    entries = iter(grads)
    return [[next(entries) for _ in layer.parameters()] for layer in model.layers]


def gradients_from(model: Net, grads: list[torch.Tensor], layer: int) -> list[torch.Tensor]:
    """The shared gradient of the parameters of layers `layer`..L-1, in the model's order."""
    return [g for per_layer in by_layer(model, grads)[layer:] for g in per_layer]
