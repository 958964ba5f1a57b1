"""Your own nn.Module (--model PATH.py:NAME or package.module:NAME, with arguments), read with torch.fx
into the Net the linear attacks take, or attacked whole (Classifier) by the optimisation attacks; and
any model by name: how it is built, checked, named in the record and described."""
from __future__ import annotations

import ast
import contextlib
import fnmatch
import functools
import hashlib
import importlib
import importlib.util
import io
import math
import re
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from leakage.activations import ACTIVATIONS, from_call, is_activation, row_of, spelled
from leakage.console import UserError, printable, say
from leakage.data import PHOTOGRAPH_CLASSES, PHOTOGRAPH_SHAPE, content_hash, file_bytes
from leakage.models import (
    MAX_SYSTEM_GIB, MODELS, Net, RANDOM_SEED, architecture, build_net, layer_shapes, load_weights,
    random_architectures
)
from leakage.runtime import PUBLISHED_SEED, seed_everything

# -- --model PATH.py:NAME: your own nn.Module, read with torch.fx into the layer sequence ---
# The attacks need a chain: convolutions, each followed by at most one invertible
# activation, a flatten, then linear layers, each with a bias (its input follows from its
# own gradient: gW = d a^T, gb = d). read_module traces the module (torch.fx) and takes
# that chain from the graph, refusing anything else by name; the layers are the module's
# own, so are the weights. The Net it gives is checked against the module's own forward.

# What is refused, and why: by module class or function name, lower case, without underscores
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


class NotAChain(UserError):
    """A module the linear attacks cannot take: every layer or call that blocks them, each
    with why, grouped by why in the message. The optimisation attacks still can (Classifier)."""

    def __init__(self, where: str, blocking: list[tuple[str, str]]):
        self.blocking = blocking
        super().__init__(f"{where}: {blocking_text(blocking)}")


def blocking_text(blocking: list[tuple[str, str]], names: int = 4) -> str:
    """Every blocking layer, grouped by why: "ReLU 'relu', ReLU 'layer1.0.relu' and 15 more:
    ReLU is not invertible (...)"; each why once, the first `names` layers of it by name."""
    groups: dict[str, list[str]] = {}
    for what, why in blocking:  # a module called twice is named once
        if what not in groups.setdefault(why, []):
            groups[why].append(what)
    parts = []
    for why, whats in groups.items():
        shown = ", ".join(whats[:names]) + (f" and {len(whats) - names} more" if len(whats) > names else "")
        parts.append(f"{shown}: {why}")
    return "; ".join(parts) + (" (the linear attacks take Conv2d, Linear, "
                               f"{', '.join(row.module.__name__ for row in ACTIVATIONS.values())} and a flatten)")


def layer_tracer():
    """torch.fx's tracer, with any subclass of nn.Conv2d or nn.Linear (the published code's
    CustomConv2d, CustomLinear) and of an activation a leaf: that layer, not its insides."""
    import torch.fx

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module: nn.Module, name: str) -> bool:
            return (isinstance(module, (nn.Conv2d, nn.Linear)) or is_activation(module)
                    or super().is_leaf_module(module, name))
    return Tracer()


def read_module(net: nn.Module, shape: tuple[int, int, int], where: str = "the model") -> Net:
    """The attacks' layer sequence of `net` on inputs of `shape`: its own Conv2d and Linear
    layers and its activations, as a Net; anything else a NotAChain naming every layer or
    call that blocks it, and why. A forward that returns a tuple (the published code's
    `(x, x_shape)`) is read through its first element."""
    import torch.fx

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the published code prints shapes in its forward
            graph = layer_tracer().trace(net)
    except Exception as e:  # data-dependent control flow, and the like
        raise NotAChain(where, [("its forward", f"torch.fx cannot trace it ({type(e).__name__}: "
                                                f"{printable(str(e), 200)})")]) from None
    modules = dict(net.named_modules())
    layers, acts, flattened, data, helpers, blocking = [], [], False, None, set(), []
    block = lambda what, why: blocking.append((what, why))  # noqa: E731
    for node in graph.nodes:
        if node.op == "placeholder":
            data = node if data is None else data
            continue
        if node.op == "output":
            out = node.args[0]
            if isinstance(out, (tuple, list)) and out:  # (x, x_shape): the logits first
                out = out[0]
            if out is not data:
                block("its output", "it is not the end of its chain of layers")
            break
        module = modules.get(node.target) if node.op == "call_module" else None
        what = (f"{type(module).__name__} '{node.target}'" if module is not None
                else f"'{getattr(node.target, '__name__', node.target)}'")
        name = type(module).__name__ if module is not None else call_name(node)
        if node.op == "get_attr":
            block(what, "reads a parameter directly (F.conv2d(x, self.w)?); use nn.Conv2d and nn.Linear modules")
            continue
        if is_size(node, helpers):  # x.size(0), x.shape[0]: a view's arguments, not a layer
            helpers.add(node)
            continue
        joins = ("does not take the output of the layer before (the attacks need a chain of layers)"
                 if not node.args or node.args[0] is not data else
                 f"combines two branches ({NOT_INVERTIBLE['add']})"
                 if any(isinstance(a, torch.fx.Node) and a is not data and a not in helpers for a in node.args[1:])
                 else None)  # where a layer of the chain's kinds stands outside a chain
        data = node
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            why = joins or (SHARED if any(module is layer for layer in layers) else None) or layer_problem(
                module, flattened, layers)
            if why is not None:
                block(what, why)
            layers.append(module)
            acts.append(None)
            continue
        act = module if is_activation(module) else None if module else from_call(
            call_name(node), tuple(node.args[1:]), dict(node.kwargs))
        if act is not None:
            why = joins or ("follows no Conv2d or Linear of its own (one activation per layer)"
                            if not layers or acts[-1] is not None else row_of(act).check(act))
            if why is not None:
                block(what, why)
            else:
                acts[-1] = act
            continue
        if is_flatten(node, module):
            if joins:
                block(what, joins)
            flattened = True
            continue
        block(what, NOT_INVERTIBLE.get(name.lower().replace("_", ""), "not a layer the attacks can invert"))
    if not layers or not isinstance(layers[-1], nn.Linear):
        block("its last layer", "it must end in an nn.Linear (R-GAP starts from the last layer's gradient)")
    elif not isinstance(layers[0], nn.Conv2d):
        block("its first layer", "it needs a convolution before its linear layers (the attacks solve their systems)")
    if blocking:
        raise NotAChain(where, blocking)
    model = Net(layers, [a if a is not None else nn.Identity() for a in acts], module_shapes(layers, shape, where))
    too_large = [(f"{type(conv).__name__} '{name_of(net, conv)}'", why) for conv, in_shape in zip(layers, model.shapes)
                 if isinstance(conv, nn.Conv2d) and (why := system_too_large(conv, in_shape))]
    if too_large:  # held to the limit an architecture string is held to, before any solve tries
        raise NotAChain(where, too_large)
    check_reproduces(net, model, shape, where)
    own = {id(p): name for name, p in net.named_parameters()}  # the layers are the module's: its parameters too
    model.names, model.listed = [own[id(p)] for p in model.parameters()], list(own.values())
    return model


# A module model has three spellings. The command line's, PATH.py:NAME, is the only one that
# is ever imported; settings_from adds its content's hash (PATH.py:NAME@HASH) and the run
# loads that file only while it still has those bytes. The record names it without its
# folder (FILE.py:NAME@HASH: RECORDED_MODULE), as images and gradients are named, so that the
# same file from another folder is the same model, an edited file another one, and no record
# names anything that could be loaded (docs/output.md, "What reading a run folder can do").
# An installed package's, package.module:NAME (torchvision.models:resnet18), is imported by the
# command that names it; the record names it so, and its version is the installed one.
# NAME may take arguments as Python writes them, literals alone: NAME(num_classes=10).
ARGUMENTS = r"(?P<args>\(.*\))?"
MODEL_FILE = re.compile(r"(?P<path>.+\.py):(?P<name>[A-Za-z_]\w*)" + ARGUMENTS + r"(?:@(?P<hash>[0-9a-f]{10}))?")
RECORDED_MODULE = re.compile(r"(?P<file>[^/\\]+\.py):(?P<name>[A-Za-z_]\w*)" + ARGUMENTS + r"@(?P<hash>[0-9a-f]{10})")
PACKAGE_MODEL = re.compile(r"(?P<package>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<name>[A-Za-z_]\w*)" + ARGUMENTS)


def is_model_file(model: str) -> bool:
    return MODEL_FILE.fullmatch(model) is not None


def is_package_model(model: str) -> bool:
    return PACKAGE_MODEL.fullmatch(model) is not None  # random:N is none: N is no name


def is_code_model(model: str) -> bool:
    """A model built by running code: a module file's or an installed package's."""
    return is_model_file(model) or is_package_model(model)


def is_module_model(model: str) -> bool:
    """A module's model, in any spelling, or as a record written before hashes names it."""
    return is_code_model(model) or RECORDED_MODULE.fullmatch(model) is not None


def recorded_model(model: str) -> str:
    """The model as the record names it: a module's FILE.py:NAME(ARGS)@HASH, without its folder."""
    m = MODEL_FILE.fullmatch(model)
    if m is None or m["hash"] is None:
        return model
    return f"{Path(m['path']).name}:{m['name']}{m['args'] or ''}@{m['hash']}"


def call_arguments(text: str | None, where: str) -> tuple[tuple, dict]:
    """NAME's arguments, '(3, num_classes=10)', as (args, kwargs): Python literals alone (no
    name is looked up, nothing is run); anything else a UserError."""
    if not text:
        return (), {}
    try:
        call = ast.parse("f" + text, mode="eval").body
        if not isinstance(call, ast.Call) or any(k.arg is None for k in call.keywords):
            raise ValueError("not a call")
        return (tuple(ast.literal_eval(a) for a in call.args),
                {k.arg: ast.literal_eval(k.value) for k in call.keywords})
    except (SyntaxError, ValueError):
        raise UserError(f"{where}: the arguments {printable(text, 100)} must be Python literals, "
                        "e.g. (num_classes=10, device='cpu')") from None


def arguments_text(args: tuple, kwargs: dict) -> str:
    """(args, kwargs) in their one spelling: '(3, num_classes=10)'; '' for none."""
    parts = [*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]
    return f"({', '.join(parts)})" if parts else ""


def module_source(model_file: str) -> tuple[str, bytes]:
    """The file of --model PATH.py:NAME[@HASH] (its path, and its bytes, read once), checked to
    be the content HASH names where it is given."""
    m = MODEL_FILE.fullmatch(model_file)
    where = f"--model {printable(model_file, 200)}"
    if not Path(m["path"]).is_file():
        raise UserError(f"{where}: no file {printable(m['path'], 200)}")
    data = file_bytes(m["path"], where)
    now = content_hash(data)
    if m["hash"] is not None and now != m["hash"]:
        raise UserError(f"{where}: {printable(m['path'], 200)} has changed since the run began (its content "
                        f"was {m['hash']}, it is {now})")
    return m["path"], data


def hashed_model_file(model_file: str) -> str:
    """PATH.py:NAME(ARGS) as the run loads it: PATH.py:NAME(ARGS)@HASH, the hash of its bytes
    now, its arguments in their one spelling."""
    m = MODEL_FILE.fullmatch(model_file)
    _, data = module_source(model_file)
    args = arguments_text(*call_arguments(m["args"], f"--model {printable(model_file, 200)}"))
    return f"{m['path']}:{m['name']}{args}@{content_hash(data)}"


@contextlib.contextmanager
def importable(folder: str):
    """The model file's folder on sys.path while it loads: a file may import its siblings."""
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def load_module(model: str, seed: int) -> nn.Module:
    """--model PATH.py:NAME[(ARGS)][@HASH] or package.module:NAME[(ARGS)]: NAME, a class or a
    function, called with its arguments after seeding (its own initialisation, under
    --model-seed). A file is run from the bytes that were checked, never read a second time,
    with its folder importable; a package is imported."""
    where = f"--model {printable(model, 200)}"
    m = MODEL_FILE.fullmatch(model) or PACKAGE_MODEL.fullmatch(model)
    args, kwargs = call_arguments(m["args"], where)
    if "path" in m.groupdict():
        path, data = module_source(model)
        loader = importlib.util.spec_from_loader(f"model_file_{hashlib.sha256(path.encode()).hexdigest()[:8]}",
                                                 loader=None, origin=path)
        source = importlib.util.module_from_spec(loader)
        source.__file__ = path
        folder, what = str(Path(path).resolve().parent), f"importing {printable(path, 200)}"
    else:
        folder, what = None, f"importing {m['package']}"
    with importable(folder) if folder else contextlib.nullcontext():
        try:
            if folder:
                exec(compile(data, path, "exec"), source.__dict__)  # the file the command names, and only it
            else:
                source = importlib.import_module(m["package"])
        except Exception as e:  # the user's code: whatever it raises is theirs
            missing = isinstance(e, ModuleNotFoundError) and e.name and e.name.partition(".")[0]
            hint = (f" (its folder, {printable(folder, 120)}, is importable while it loads: is {missing}.py there, "
                    "or is it a package to install?)" if folder and missing else "")
            raise UserError(f"{where}: {what} fails: {type(e).__name__}: {printable(str(e), 200)}{hint}") from None
        make = getattr(source, m["name"], None)
        if not callable(make):
            raise UserError(f"{where}: {printable(m.groupdict().get('path') or m['package'], 200)} defines no class "
                            f"or function {m['name']}")
        seed_everything(seed)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                net = make(*args, **kwargs)
        except Exception as e:
            raise UserError(f"{where}: {m['name']}{arguments_text(args, kwargs) or '()'} fails: "
                            f"{type(e).__name__}: {printable(str(e), 200)}") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"{where}: {m['name']}() gives a {type(net).__name__}, not an nn.Module")
    return net.float()


class Classifier(nn.Module):
    """Any nn.Module that maps (B, C, H, W) images to (B, K) logits, attacked whole: what the
    optimisation attacks (DLG, iDLG, Cosine+TV) take where the linear ones cannot (a ReLU,
    pooling, BatchNorm, a residual block). It runs in the mode it is in: in train mode,
    BatchNorm normalises each batch by its own statistics, the client's on its private batch
    and the attacker's on its dummy one (the assumption of invertinggradients, Geiping et al.
    2020); in eval mode, by the running statistics both hold."""

    def __init__(self, net: nn.Module, shape: tuple[int, int, int], classes: int, blocking: list[tuple[str, str]],
                 where: str):
        super().__init__()
        self.net, self.shapes, self.blocking = net, [tuple(shape)], blocking
        self.names = [name for name, _ in net.named_parameters()]
        self.listed = list(self.names)
        self.bias_at = output_bias(net, classes)
        if self.bias_at is None:
            raise UserError(f"{where}: it has no nn.Linear of {classes} outputs with a bias, so the label cannot be "
                            "read from its gradient")
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.net(x))


def output_bias(net: nn.Module, classes: int) -> int | None:
    """Where the output layer's bias is among the parameters: the last nn.Linear of `classes`
    outputs with a bias (its gradient gives the labels away; iDLG's rule)."""
    position = {id(p): i for i, p in enumerate(net.parameters())}
    linear = [m for m in net.modules() if isinstance(m, nn.Linear) and m.out_features == classes and m.bias is not None]
    return position[id(linear[-1].bias)] if linear else None


def module_model(model: str, seed: int, shape: tuple[int, int, int], classes: int,
                 weights: str | None = None, weights_name: str | None = None,
                 mode: str | None = None) -> Net | Classifier:
    """The model of --model PATH.py:NAME or package.module:NAME on inputs of `shape`: the
    module's own layers and weights (its initialisation, or the state_dict in `weights`), in
    `mode` (train or eval; None: as NAME built it). Its chain as a Net, where the linear
    attacks can take it; otherwise the whole module, a Classifier."""
    where = f"--model {printable(model, 200)}"
    net = load_module(model, seed)
    if weights is not None:
        load_weights(net, weights, weights_name)
    if mode is not None:
        net.train(mode == "train")
    frozen = [name for name, p in net.named_parameters() if not p.requires_grad]
    if frozen:
        raise UserError(f"{where}: its parameter '{frozen[0]}' is frozen (requires_grad=False): a client shares "
                        "the gradient of every parameter it trains; give a module whose parameters all train")
    try:
        chain = read_module(net, shape, where)
    except NotAChain as e:
        chain, blocking = None, e.blocking
    outputs = chain.layers[-1].out_features if chain is not None else logits_shape(net, shape, where)
    if outputs != classes:
        raise UserError(f"{where}: it has {outputs} outputs, and the data {classes} classes")
    return chain if chain is not None else Classifier(net, shape, classes, blocking, where)


def logits_shape(net: nn.Module, shape: tuple[int, int, int], where: str) -> int:
    """K, where the module maps one (C, H, W) image, as the client holds it, to (1, K) logits in
    the mode it is in; anything else a UserError."""
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            out = logits_of(net(torch.zeros(1, *shape)))
    except Exception as e:
        why = printable(str(e).splitlines()[0] if str(e) else "", 200)
        hint = ("; in train mode its BatchNorm normalises one image by its own statistics: --module-mode eval "
                "uses the running ones" if net.training and "more than 1 value per channel" in str(e) else "")
        raise UserError(f"{where}: on one {'x'.join(map(str, shape))} image its forward fails: "
                        f"{type(e).__name__}: {why}{hint}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{where}: on one {'x'.join(map(str, shape))} image it gives {got}, not (1, K) logits")
    return out.shape[1]


def build_model(name: str, seed: int = PUBLISHED_SEED, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE,
                classes: int = PHOTOGRAPH_CLASSES, weights: str | None = None, weights_name: str | None = None,
                mode: str | None = None) -> Net | Classifier:
    """Any model by name: a zoo name or an architecture string (models.build_net), or your
    own module, PATH.py:NAME[@HASH] or package.module:NAME (module_model)."""
    if is_code_model(name):
        return module_model(name, seed, shape, classes, weights, weights_name, mode)
    return build_net(name, seed, shape, classes, weights, weights_name)


class Layout(NamedTuple):
    """What the record says of a model: its layers in the grammar's words and each layer's
    unknowns (None for a module that is no chain), and what blocks the linear attacks."""

    architecture: str | None
    unknowns: tuple[int, ...] | None
    blocking: tuple[tuple[str, str], ...] = ()


@functools.cache
def module_layout(model: str, shape: tuple[int, int, int]) -> Layout:
    """A module model's Layout: its layers in the grammar's words (extended where the grammar
    has none: KxK' kernels, softplusB, a hidden fcN), and each layer's unknowns; or, for a
    module that is no chain, what blocks it. Read once a process."""
    net = load_module(model, PUBLISHED_SEED)
    try:
        chain = read_module(net, shape, f"--model {printable(model, 200)}")
    except NotAChain as e:
        return Layout(None, None, tuple(e.blocking))
    return Layout(architecture_text(chain), tuple(math.prod(s) for s in chain.shapes[:-1]))


def model_blocking(model: str, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> tuple[tuple[str, str], ...]:
    """What blocks the linear attacks (R-GAP, the hybrid) and --analyse on a model: nothing
    for the zoo's and architecture strings; a module's layers and why."""
    return module_layout(model, shape).blocking if is_code_model(model) else ()


def architecture_text(model: Net) -> str:
    """A Net in the architecture grammar's words (the grammar's own string where it is one)."""
    def pair(values: tuple) -> str:
        return str(values[0]) if values[0] == values[1] else "x".join(map(str, values))

    parts = []
    for i, (layer, act) in enumerate(zip(model.layers, model.acts)):
        if isinstance(layer, nn.Conv2d):
            parts.append(f"{layer.out_channels}k{pair(layer.kernel_size)}s{pair(layer.stride)}"
                         f"p{pair(layer.padding)}{'b' * (layer.bias is not None)}-{spelled(act)}")
        else:
            parts.append(f"fc{'' if i == len(model.layers) - 1 else layer.out_features}-{spelled(act)}")
    return ",".join(parts)


SHARED = ("is called twice (its weights shared): each layer of the chain has its own weights, whose gradient "
          "sums the two uses")


def layer_problem(module: nn.Module, flattened: bool, layers: list[nn.Module]) -> str | None:
    """Why the linear attacks cannot take this Conv2d or Linear where it stands, or None."""
    if (nn.utils.parametrize.is_parametrized(module) or module._forward_pre_hooks or module._forward_hooks
            or not isinstance(getattr(module, "weight", None), nn.Parameter)):
        return ("computes with a weight that is not its parameter (weight_norm, prune or another hook or "
                "parametrization): the gradient shared is of the parameters behind it")
    if isinstance(module, nn.Linear):
        return None if module.bias is not None else \
            "has no bias: its input cannot be read from its gradient (bias=True)"
    if layers and isinstance(layers[-1], nn.Linear) or flattened:
        return "comes after the flatten: convolutions first, then linear layers"
    if module.groups != 1 or module.dilation != (1, 1):
        return f"has groups {module.groups} and dilation {module.dilation}: only groups 1 and dilation 1 are supported"
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return (f"give its padding as numbers, padded with zeros (not padding={module.padding!r}, "
                f"padding_mode={module.padding_mode!r})")
    return None


def name_of(net: nn.Module, layer: nn.Module) -> str:
    return next(name for name, m in net.named_modules() if m is layer)


def system_too_large(conv: nn.Conv2d, shape: tuple[int, int, int]) -> str | None:
    """Why R-GAP's system of this convolution on inputs of `shape` would not fit (U in float64
    beyond MAX_SYSTEM_GIB, the limit of architecture strings), or None."""
    (c, h, w), (kh, kw), (sh, sw), (ph, pw) = shape, conv.kernel_size, conv.stride, conv.padding
    rows = conv.out_channels * ((h + 2 * ph - kh) // sh + 1) * ((w + 2 * pw - kw) // sw + 1)
    gib = 8 * (rows + conv.out_channels * c * kh * kw) * c * h * w / 2**30
    return (f"its linear system would take {gib:.1f} GiB in float64 (the limit is {MAX_SYSTEM_GIB:g} GiB)"
            if gib > MAX_SYSTEM_GIB else None)


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


def logits_of(output: object) -> torch.Tensor:
    """A forward's logits: its output, or a tuple's first element (the published code returns
    `(x, x_shape)`)."""
    return output[0] if isinstance(output, (tuple, list)) and output else output


def check_reproduces(net: nn.Module, model: Net, shape: tuple[int, int, int], where: str) -> None:
    """The layer sequence must compute what the module computes: on a random input, to
    float rounding. (A forward that does more than its graph shows, say, is refused.)"""
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(model.layers[0].weight.device)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        theirs, ours = logits_of(net(x)), model(x)
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-5, atol=1e-6):
        raise UserError(f"{where}: the layers read from it do not reproduce its forward")


def layer_unknowns(model: str, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> list[int] | None:
    """n_l: each layer's unknowns but the last's, the size of its input, on inputs of `shape`.
    A module's are read from its file: only in a run whose command names it (the record
    states them, as `unknowns`, for every reader after)."""
    if is_code_model(model):
        unknowns = module_layout(model, shape).unknowns
        return None if unknowns is None else list(unknowns)
    return [math.prod(s) for s in layer_shapes(architecture(model, shape), shape=shape)[:-1]]


def model_text(model: str, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> str | None:
    """A model's architecture as the record states it (None: a module that is no chain)."""
    return module_layout(model, shape).architecture if is_code_model(model) else str(architecture(model, shape))


def model_stem(model_name: str) -> str:
    """A model as file and folder names give it: a zoo name, or 'arch-' and a hash of its
    architecture string (the record holds the string), or a module's NAME-HASH (its content's)."""
    module = (MODEL_FILE.fullmatch(model_name) or RECORDED_MODULE.fullmatch(model_name)
              or PACKAGE_MODEL.fullmatch(model_name))
    if module is not None:  # lenet.py:LeNet@3fa2b1c0d9 -> LeNet-3fa2b1c0d9
        named = module.groupdict().get("hash") if not module["args"] else None  # arguments: the whole name's hash
        return f"{module['name']}-{named or hashlib.sha256(recorded_model(model_name).encode()).hexdigest()[:10]}"
    return model_name if model_name in MODELS else "arch-" + hashlib.sha256(model_name.encode()).hexdigest()[:10]


def expand_models(names: list[str], shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> list[str]:
    """'all' -> every model; a shell pattern (fnmatch) -> the models it matches, in the
    zoo's order; random:N -> N draws for inputs of `shape`; a name stays. Each model once,
    in the order given."""
    out = []
    for name in names:
        if name == "all" or any(c in name for c in "*?[") and not is_code_model(name) and ".py:" not in name:
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
        elif name.endswith(".py"):
            raise UserError(f"--model {printable(name, 200)}: a Python file needs the name of the class or function "
                            f"that builds the model: {printable(name, 200)}:NAME")
        elif ".py:" in name and not is_model_file(name):
            raise UserError(f"--model {printable(name, 200)}: expected PATH.py:NAME, or PATH.py:NAME(ARGS) with "
                            "Python literals as arguments")
        elif "-" not in name and not is_code_model(name):
            raise UserError(f"unknown model '{printable(name, 80)}' (--list-models lists the {len(MODELS)} models; or "
                            "give an architecture string, e.g. 8k3s1p0-tanh,fc-id, your module as PATH.py:NAME, or an "
                            "installed one as package.module:NAME, e.g. 'torchvision.models:resnet18(num_classes=10)')")
        else:
            canonical = canonical_model(name, shape)  # checked now
            if canonical != name and not is_code_model(name):
                say(f"--model {printable(name, 80)} is {canonical}: run as that")
            out.append(canonical)
    same = {m: recorded_model(m) if is_model_file(m) else m for m in out}  # one file from two paths: one model
    if len(set(same.values())) < len(out):
        say("models given twice (in whatever spelling) run once")
    first: dict[str, str] = {}
    for m in out:
        first.setdefault(same[m], m)
    return list(first.values())


def canonical_model(name: str, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> str:
    """A model's one name: a zoo name, or an architecture string in its canonical spelling,
    which is the zoo's name where it is a zoo model's string (checked on inputs of `shape`)."""
    if name in MODELS:
        return name
    if is_model_file(name):  # PATH.py:NAME@HASH: the run loads this content alone
        hashed = hashed_model_file(name)
        module_layout(hashed, shape)  # read now: a module the attacks cannot take is refused before any folder
        return hashed
    if is_package_model(name):  # its arguments in their one spelling
        m = PACKAGE_MODEL.fullmatch(name)
        spelled = f"{m['package']}:{m['name']}{arguments_text(*call_arguments(m['args'], f'--model {name}'))}"
        module_layout(spelled, shape)
        return spelled
    text = str(architecture(name, shape))  # parsed once a process: every entry of a record read asks
    return next((m for m, t in MODELS.items() if t == text), text)
