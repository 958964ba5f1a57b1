"""Your own nn.Module, read with torch.fx into the attacks' layer sequence: every
supported form, every refusal, several linear layers, and a module equal to an
architecture string giving that string's model and numbers."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hybrid as H
from leakage.console import UserError
from leakage.data import to_image
from leakage.metrics import score
from leakage.models import draw_uniform
from leakage.modules import build_model, load_module, module_model, read_module
from leakage.paper import client_gradient, recursive_reconstruction
from leakage.runtime import PUBLISHED_SEED, seed_everything

SHAPE = (3, 32, 32)


class LeNet(nn.Module):
    """DLG's LeNet as its papers write it (sigmoid, bias, a view), on CIFAR's input."""

    def __init__(self, classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid())
        self.fc = nn.Linear(768, classes)

    def forward(self, x):
        out = self.body(x)
        return self.fc(out.view(out.size(0), -1))


LENET = "12k5s2p2b-sigmoid,12k5s2p2b-sigmoid,12k5s1p2b-sigmoid,fc-id"


class Cnn2C2(nn.Module):
    """cnn2_c2 (6k4s2p0-tanh,fc-id) with a functional activation and torch.flatten."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 4, 2, 0, bias=False)
        self.fc = nn.Linear(6 * 15 * 15, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.tanh(self.conv(x)), 1))


def built(make, seed=PUBLISHED_SEED):
    seed_everything(seed)
    return make()


@pytest.mark.parametrize("make, text", [(LeNet, LENET), (Cnn2C2, "cnn2_c2")])
def test_a_module_equal_to_a_string_is_that_strings_model(make, text):
    ours, theirs = read_module(built(make), SHAPE), build_model(text)
    assert [type(a) for a in ours.acts] == [type(a) for a in theirs.acts] and ours.shapes == theirs.shapes
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))
    for a, b in zip(ours.layers[:-1], theirs.layers[:-1]):
        assert (a.kernel_size, a.stride, a.padding) == (b.kernel_size, b.stride, b.padding)


def test_a_module_equal_to_a_string_gives_its_numbers(chelsea):
    ours, theirs = read_module(built(Cnn2C2), SHAPE), build_model("cnn2_c2")
    grads = [client_gradient(m, chelsea.x, chelsea.label) for m in (ours, theirs)]
    (x1, d1, _), (x2, d2, _) = (recursive_reconstruction([m], [g])[0] for m, g in zip((ours, theirs), grads))
    assert d1 == d2 and torch.equal(x1, x2)


class Forms(nn.Module):
    def __init__(self, act, flatten):
        super().__init__()
        self.conv, self.act, self.flatten = nn.Conv2d(3, 2, 3, 2, 1), act, flatten
        self.fc = nn.Linear(2 * 16 * 16, 4)

    def forward(self, x):
        a = self.conv(x)
        a = self.act(a) if isinstance(self.act, nn.Module) else self.act(a)
        return self.fc(self.flatten(a))


ACTS = [(nn.Tanh(), nn.Tanh), (torch.sigmoid, nn.Sigmoid), (lambda a: a.tanh(), nn.Tanh),
        (lambda a: F.softplus(a, beta=2.0), nn.Softplus), (nn.Softplus(beta=3.0), nn.Softplus),
        (lambda a: F.leaky_relu(a, 0.2), nn.LeakyReLU), (nn.LeakyReLU(0.3), nn.LeakyReLU), (nn.Identity(), nn.Identity)]
FLATTENS = [nn.Flatten(), lambda a: torch.flatten(a, 1), lambda a: a.flatten(1), lambda a: a.view(a.size(0), -1),
            lambda a: a.reshape(a.shape[0], -1)]


@pytest.mark.parametrize("act, kind", ACTS)
@pytest.mark.parametrize("flatten", FLATTENS)
def test_every_supported_form_is_read(act, kind, flatten):
    model = read_module(Forms(act, flatten), SHAPE)
    assert isinstance(model.acts[0], kind) and isinstance(model.acts[1], nn.Identity)
    if kind is nn.Softplus:
        assert model.acts[0].beta in (2.0, 3.0)
    if kind is nn.LeakyReLU:
        assert model.acts[0].negative_slope in (0.2, 0.3)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 3, 3, 1, 1), nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x) + x).flatten(1))


class ReadsAParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.fc = nn.Parameter(torch.zeros(2, 3, 3, 3)), nn.Linear(2 * 30 * 30, 10)

    def forward(self, x):
        return self.fc(F.conv2d(x, self.w).flatten(1))


def chain(*layers, flatten_at=None):
    """A Sequential of `layers` with a Flatten before the first Linear."""
    out = []
    for layer in layers:
        if isinstance(layer, nn.Linear) and not any(isinstance(m, nn.Flatten) for m in out):
            out.append(nn.Flatten())
        out.append(layer)
    return nn.Sequential(*out)


REFUSED = [
    (chain(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Linear(1800, 10)), "ReLU is not invertible"),
    (Forms(F.relu, nn.Flatten()), "ReLU is not invertible"),
    (chain(nn.Conv2d(3, 2, 3), nn.LeakyReLU(0.0), nn.Linear(1800, 10)), "slope 0.0"),
    (chain(nn.Conv2d(3, 2, 3), nn.MaxPool2d(2), nn.Linear(450, 10)), "MaxPool2d"),
    (chain(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Linear(1800, 10)), "BatchNorm2d"),
    (Residual(), "residual addition"),
    (ReadsAParameter(), "reads a parameter directly"),
    (chain(nn.Conv2d(3, 2, 3), nn.Linear(1800, 10, bias=False)), "has no bias"),
    (chain(nn.Conv2d(3, 2, 3, groups=1), nn.Conv2d(2, 2, 3, groups=2), nn.Linear(1568, 10)), "groups 2"),
    (chain(nn.Conv2d(3, 2, 3, dilation=2), nn.Linear(1568, 10)), "dilation"),
    (chain(nn.Conv2d(3, 2, 3, padding="same"), nn.Linear(2048, 10)), "padding as numbers"),
    (chain(nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"), nn.Linear(2048, 10)), "padding as numbers"),
    (chain(nn.Conv2d(3, 2, 3), nn.Tanh(), nn.Sigmoid(), nn.Linear(1800, 10)), "one activation per layer"),
    (chain(nn.Conv2d(3, 2, 3), nn.Tanh()), "must end in an nn.Linear"),
    (chain(nn.Linear(3072, 10)), "needs a convolution"),
    (chain(nn.Conv2d(3, 2, 3), nn.Linear(1800, 50), nn.Conv2d(2, 2, 1)), "after the flatten"),
    (chain(nn.Conv2d(3, 2, 3), nn.Linear(999, 10)), "fails"),
    (chain(nn.Conv2d(3, 2, 3), nn.Dropout(0.5), nn.Linear(1800, 10)), "dropout"),
]


@pytest.mark.parametrize("net, why", REFUSED, ids=[w for _, w in REFUSED])
def test_what_the_attacks_cannot_invert_is_refused_by_name(net, why):
    with pytest.raises(UserError, match=why) as refused:
        read_module(net, SHAPE, "--model m.py:Net")
    assert str(refused.value).startswith("--model m.py:Net: ") and "\n" not in str(refused.value)


def test_several_linear_layers_each_read_from_their_own_gradient(chelsea):
    """A full-rank convolution under two biased linear layers: the first linear layer's
    input comes from its own gradient, so R-GAP still recovers the image."""
    seed_everything(0)
    net = chain(nn.Conv2d(3, 12, 4, 2, 0), nn.Tanh(), nn.Linear(12 * 15 * 15, 40), nn.Sigmoid(), nn.Linear(40, 10))
    model = read_module(net, SHAPE)
    assert model.first_linear == 1 and len(model.layers) == 3
    grads = client_gradient(model, chelsea.x, chelsea.label)
    ((x, deficiency, _),) = recursive_reconstruction([model], [grads])
    assert deficiency == [0, 0]  # the convolution is determined; a linear layer always is
    assert score(to_image(chelsea.x), to_image(x))["psnr"] > 60


# -- --model PATH.py:NAME, --weights, --init, from the command line --------------------------

LENET_FILE = '''
import torch.nn as nn


class LeNet(nn.Module):  # DLG's, on MNIST's 1x28x28
    def __init__(self):
        super().__init__()
        act = nn.Sigmoid
        self.body = nn.Sequential(
            nn.Conv2d(1, 12, kernel_size=5, padding=5 // 2, stride=2), act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=5 // 2, stride=2), act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=5 // 2, stride=1), act())
        self.fc = nn.Sequential(nn.Linear(588, 10))

    def forward(self, x):
        out = self.body(x)
        out = out.view(out.size(0), -1)
        return self.fc(out)


def relu_net():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(1352, 10))
'''


@pytest.fixture
def lenet_file(tmp_path):
    path = tmp_path / "lenet.py"
    path.write_text(LENET_FILE)
    return path


def psnrs(output):
    import json

    from conftest import the_folder
    runs = json.loads((the_folder(output) / "results.json").read_text())["runs"]
    return [(r["image"], a, e["psnr"], e["label"]) for r in runs for a, e in sorted(r["attacks"].items())]


@pytest.mark.slow
@pytest.mark.parametrize("init", [[], ["--init", "uniform:0.5"]])
def test_a_module_file_runs_with_the_numbers_of_its_string(lenet_file, tmp_path, init):
    args = ["--quick", "--dlg-iters", "2", "--source", "mnist-test", "--index", "0-3", "--attacks", "rgap", "idlg",
            *init]
    assert H.main([*args, "--model", f"{lenet_file}:LeNet", "--output", str(tmp_path / "module")]) == 0
    assert H.main([*args, "--model", LENET, "--output", str(tmp_path / "string")]) == 0
    assert psnrs(tmp_path / "module") == psnrs(tmp_path / "string")


def test_the_dlg_initialisation_draws_every_parameter_within_its_bound():
    model = build_model(LENET, shape=(1, 28, 28))
    draw_uniform(model, 0.5, 1)
    values = torch.cat([p.flatten() for p in model.parameters()])
    assert values.abs().max() <= 0.5 and values.abs().max() > 0.49 and values.std() > 0.25


def test_weights_from_a_state_dict_are_the_models(lenet_file, tmp_path, capsys):
    net = load_module(f"{lenet_file}:LeNet", 7)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    model = module_model(f"{lenet_file}:LeNet", PUBLISHED_SEED, (1, 28, 28), 10, str(tmp_path / "w.pt"))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), net.parameters()))
    state = net.state_dict()
    state["fc.0.weight"] = state["fc.0.weight"][:, :10]
    torch.save(state, tmp_path / "bad.pt")
    assert H.main(["--analyse", "--source", "mnist-test", "--index", "0", "--model", f"{lenet_file}:LeNet",
                   "--weights", str(tmp_path / "bad.pt")]) == 2
    assert "'fc.0.weight' is (10, 10)" in capsys.readouterr().err


@pytest.mark.parametrize("spec, why", [("{f}:relu_net", "ReLU is not invertible"), ("{f}:Missing", "defines no"),
                                       ("{d}/none.py:LeNet", "no file")])
def test_a_module_file_refused_is_one_line(lenet_file, spec, why, capsys):
    from conftest import one_line

    spec = spec.format(f=lenet_file, d=lenet_file.parent)
    assert H.main(["--analyse", "--source", "mnist-test", "--index", "0", "--model", spec]) == 2
    assert why in one_line(capsys.readouterr().err)


def test_a_module_with_other_classes_than_the_data_is_refused(lenet_file, capsys):
    assert H.main(["--analyse", "--source", "cifar100-test", "--index", "0", "--model", f"{lenet_file}:LeNet"]) == 2
    assert "fails" in capsys.readouterr().err  # 1 input channel against CIFAR's 3
