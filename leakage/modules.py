"""Your own nn.Module (--model PATH.py:NAME), read with torch.fx into the Net the attacks take, and any
model by name: how it is built, checked, named in the record and described."""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import importlib.util
import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from leakage.activations import ACTIVATIONS, from_call, is_activation, row_of, spelled
from leakage.console import UserError, printable, say
from leakage.data import PHOTOGRAPH_CLASSES, PHOTOGRAPH_SHAPE, content_hash, file_bytes
from leakage.models import (
    MODELS, Net, RANDOM_SEED, architecture, build_net, layer_shapes, load_weights, random_architectures
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
        act = module if is_activation(module) else None if module else from_call(
            call_name(node), tuple(node.args[1:]), dict(node.kwargs))
        if act is not None:
            if not layers or acts[-1] is not None:
                raise UserError(f"{where}: {what} follows no Conv2d or Linear of its own (one activation per layer)")
            why = row_of(act).check(act)
            if why is not None:
                raise UserError(f"{where}: {what} {why}")
            acts[-1] = act
            continue
        if is_flatten(node, module):
            flattened = True
            continue
        why = NOT_INVERTIBLE.get(name.lower().replace("_", ""), "not a layer the attacks can invert")
        raise UserError(f"{where}: {what}: {why} (supported: Conv2d, Linear, "
                        f"{', '.join(row.module.__name__ for row in ACTIVATIONS.values())} and a flatten)")
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
    data = file_bytes(m["path"], where)
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


def build_model(name: str, seed: int = PUBLISHED_SEED, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE,
                classes: int = PHOTOGRAPH_CLASSES, weights: str | None = None, weights_name: str | None = None) -> Net:
    """Any model by name: a zoo name or an architecture string (models.build_net), or your
    own module, PATH.py:NAME[@HASH] (module_model)."""
    if is_model_file(name):
        return module_model(name, seed, shape, classes, weights, weights_name)
    return build_net(name, seed, shape, classes, weights, weights_name)


@functools.cache
def module_layout(model_file: str, shape: tuple[int, int, int]) -> tuple[str, tuple[int, ...]]:
    """What the record says of a module model: its layers in the grammar's words (extended
    where the grammar has none: KxK' kernels, softplusB, a hidden fcN), and each layer's
    unknowns. Read once a process."""
    model = read_module(load_module(model_file, PUBLISHED_SEED), shape, f"--model {printable(model_file, 200)}")
    return architecture_text(model), tuple(math.prod(s) for s in model.shapes[:-1])


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


def layer_unknowns(model: str, shape: tuple[int, int, int] = PHOTOGRAPH_SHAPE) -> list[int]:
    """n_l: each layer's unknowns but the last's, the size of its input, on inputs of `shape`.
    A module's are read from its file: only in a run whose command names it (the record
    states them, as `unknowns`, for every reader after)."""
    if is_model_file(model):
        return list(module_layout(model, shape)[1])
    return [math.prod(s) for s in layer_shapes(architecture(model, shape), shape=shape)[:-1]]


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
        elif name.endswith(".py"):
            raise UserError(f"--model {printable(name, 200)}: a Python file needs the name of the class or function "
                            f"that builds the model: {printable(name, 200)}:NAME")
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
