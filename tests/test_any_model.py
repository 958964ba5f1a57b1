"""Any nn.Module under the optimisation attacks, the published code's own model forms, and the
fingerprints of a captured gradient (#43)."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

import hybrid as H
from conftest import one_line, the_folder
from leakage.console import UserError
from leakage.data import load_photographs
from leakage.gradients import fingerprint, pixel_space_hint
from leakage.models import MODELS, Net, architecture, build_net, draw_uniform
from leakage.modules import Classifier, build_model
from leakage.paper import client_gradient

SHAPE = (3, 32, 32)


# -- The published code's forms: a subclass of nn.Conv2d, a constructor that takes the device,
# a loop over a ModuleList that prints shapes, and a forward that returns (x, x_shape) --------

def published_form(name: str) -> str:
    """A zoo model written in the forms of the published code's model file (our own text)."""
    arch, layers, shapes = architecture(name), [], None
    from leakage.models import layer_shapes
    shapes = layer_shapes(arch)
    for conv, (c, _, _) in zip(arch.convs, shapes):
        layers.append(f"PaperConv(in_channels={c}, out_channels={conv.out}, kernel_size={conv.kernel}, "
                      f"stride={conv.stride}, padding={conv.padding}, bias={conv.bias}).to(device)")
    c, h, w = shapes[-1]
    layers.append(f"PaperLinear(in_features={c * h * w}, out_features=10).to(device)")
    act = {"tanh": "nn.Tanh()", "id": "nn.Identity()", "sigmoid": "nn.Sigmoid()", "softplus": "nn.Softplus()",
           "leaky": "nn.LeakyReLU()", "leaky0.2": "nn.LeakyReLU(negative_slope=0.2)"}
    acts = [act[conv.act] for conv in arch.convs] + [act[arch.fc_act]]
    return f'''
class {name}(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.module_list = nn.ModuleList([{", ".join(layers)}])
        self.activation_list = nn.ModuleList([{", ".join(acts)}])

    def forward(self, input):
        x, x_shape = input, []
        for layer, act in zip(self.module_list, self.activation_list):
            if isinstance(layer, nn.Linear):
                x = torch.flatten(x, 1)
            print("shape of x before a layer: {{}}".format(x.shape))
            x = act(layer(x))
            x_shape.append(x.shape)
        return x, x_shape
'''


PUBLISHED_HEAD = '''
import torch
from torch import nn


class PaperConv(torch.nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, 1, 1, bias, "zeros")

    def forward(self, input):
        return super(PaperConv, self).forward(input)


class PaperLinear(torch.nn.Linear):
    def forward(self, input):
        return super(PaperLinear, self).forward(input)
'''


@pytest.fixture(scope="module")
def published_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("published") / "targets.py"
    path.write_text(PUBLISHED_HEAD + "".join(published_form(name) for name in MODELS))
    return path


@pytest.mark.parametrize("name", list(MODELS))
def test_the_published_forms_load_as_the_zoo_model_to_the_bit(published_file, name, capsys):
    ours = build_model(f"{published_file}:{name}(device='cpu')")
    zoo = build_model(name)
    assert isinstance(ours, Net) and len(ours.layers) == len(zoo.layers)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), zoo.parameters()))
    x = torch.randn(2, *SHAPE)
    assert torch.equal(ours(x), zoo(x))
    assert "shape of x" not in capsys.readouterr().out  # its prints are its own, not the run's


def test_the_published_forms_give_the_zoo_numbers(published_file, tmp_path):
    """Ranks, PSNR and labels on two images: the file's model is the zoo's."""
    def entries(model, out):
        assert H.main(["--quick", "--source", "samples", "--index", "0", "3", "--attacks", "rgap", "--model", model,
                       "--output", str(out)]) == 0
        runs = json.loads((the_folder(out) / "results.json").read_text())["runs"]
        return [(r["image"], r["rank_deficiency"], r["attacks"]["rgap"]["psnr"], r["attacks"]["rgap"]["label"])
                for r in runs]
    assert entries(f"{published_file}:cnn3_c2(device='cpu')", tmp_path / "file") == entries("cnn3_c2", tmp_path / "zoo")


def test_a_model_file_imports_its_siblings(tmp_path):
    (tmp_path / "blocks.py").write_text("import torch.nn as nn\nWIDTH = 4\n")
    (tmp_path / "net.py").write_text("import torch.nn as nn\nfrom blocks import WIDTH\n\n"
                                     "def net(classes=10):\n    return nn.Sequential(nn.Conv2d(3, WIDTH, 3), "
                                     "nn.Tanh(), nn.Flatten(), nn.Linear(WIDTH * 900, classes))\n")
    model = build_model(f"{tmp_path}/net.py:net(classes=10)")
    assert model.layers[0].out_channels == 4
    assert str(tmp_path) not in __import__("sys").path  # importable only while it loads


@pytest.mark.parametrize("arguments", ["(classes=__import__('os'))", "(classes=)", "(**{'a': 1})"])
def test_arguments_are_python_literals_or_one_line(tmp_path, arguments, capsys):
    (tmp_path / "net.py").write_text("def net(classes=10):\n    pass\n")
    assert H.main(["--analyse", "--model", f"{tmp_path}/net.py:net{arguments}"]) == 2
    assert "must be Python literals" in one_line(capsys.readouterr().err)


# -- A CNN as FL tutorials write it: every optimisation attack runs, the linear ones step aside --

TUTORIAL = '''
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


import torch


def with_batchnorm():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(3600, 10))


def in_eval_mode():
    return with_batchnorm().eval()
'''


@pytest.fixture
def tutorial(tmp_path):
    path = tmp_path / "tutorial.py"
    path.write_text(TUTORIAL)
    return path


def attacks_run(out):
    runs = json.loads((the_folder(out) / "results.json").read_text())["runs"]
    return sorted(a for r in runs for a in r["attacks"])


def test_a_relu_cnn_runs_every_optimisation_attack(tutorial, tmp_path, capsys):
    args = ["--quick", "--dlg-iters", "2", "--cosine-iters", "5", "--source", "samples", "--index", "0",
            "--model", f"{tutorial}:Net"]
    assert H.main([*args, "--output", str(tmp_path / "a")]) == 0
    assert attacks_run(tmp_path / "a") == ["cosine", "dlg", "idlg"]
    said = capsys.readouterr().out
    assert "R-GAP, Hybrid left out" in said and "running DLG, iDLG, Cosine+TV" in said


def test_a_linear_attack_is_refused_by_attack_not_by_run(tutorial, tmp_path, capsys):
    args = ["--quick", "--source", "samples", "--index", "0", "--model", f"{tutorial}:Net"]
    assert H.main([*args, "--attacks", "rgap", "dlg", "--dlg-iters", "2", "--output", str(tmp_path / "a")]) == 0
    assert attacks_run(tmp_path / "a") == ["dlg"]
    refusal = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rgap: ")]
    assert len(refusal) == 1 and "R-GAP cannot take it" in refusal[0]
    assert H.main([*args, "--attacks", "rgap", "hybrid"]) == 2
    assert "R-GAP and Hybrid cannot take it" in one_line(capsys.readouterr().err)
    assert H.main([*args[1:], "--analyse"]) == 2
    assert "--analyse" in one_line(capsys.readouterr().err)


def test_a_refusal_names_every_blocking_layer(tutorial, capsys):
    assert H.main(["--analyse", "--source", "samples", "--index", "0", "--model", f"{tutorial}:with_batchnorm"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "BatchNorm2d '1'" in err and "ReLU '2'" in err


def test_a_package_model_with_arguments(tmp_path, monkeypatch, capsys):
    package = tmp_path / "fl_models"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "small.py").write_text(TUTORIAL)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert H.main(["--quick", "--dlg-iters", "2", "--source", "samples", "--index", "0", "--attacks", "idlg",
                   "--model", "fl_models.small:Net( classes = 10 )", "--output", str(tmp_path / "out")]) == 0
    runs = json.loads((the_folder(tmp_path / "out") / "results.json").read_text())["runs"]
    assert runs[0]["model"] == "fl_models.small:Net(classes=10)" and runs[0]["architecture"] is None


def test_the_module_mode_is_the_clients_and_the_attackers(tutorial, chelsea):
    spec = f"{tutorial}:with_batchnorm"
    train, evaluated = build_model(spec, mode="train"), build_model(spec, mode="eval")
    assert isinstance(train, Classifier) and train.training and train.net[1].training
    assert not evaluated.net[1].training
    assert not build_model(f"{tutorial}:in_eval_mode").net[1].training  # as NAME built it, by default
    assert build_model(f"{tutorial}:in_eval_mode", mode="train").net[1].training
    # the mode is what the gradient is of: BatchNorm's batch statistics against its running ones
    ours, theirs = (client_gradient(m, chelsea.x, chelsea.label) for m in (train, evaluated))
    assert not torch.allclose(ours[0], theirs[0])


def test_train_mode_batchnorm_on_one_image_is_one_line(capsys):
    net = "torchvision.models:resnet18(num_classes=10)"
    assert H.main(["--quick", "--source", "samples", "--index", "0", "--attacks", "dlg", "--model", net]) == 2
    assert "--module-mode eval" in one_line(capsys.readouterr().err)


@pytest.mark.slow
def test_resnet18_runs_the_optimisation_attacks_and_refuses_the_linear_ones(tmp_path, capsys):
    net = ["--model", "torchvision.models:resnet18(num_classes=10)", "--module-mode", "eval",
           "--source", "cifar10-test", "--index", "0"]
    assert H.main([*net, "--quick", "--output", str(tmp_path)]) == 0
    assert attacks_run(tmp_path) == ["cosine", "dlg", "idlg"]
    for attacks in (["rgap"], ["hybrid"]):
        assert H.main([*net, "--attacks", *attacks]) == 2
        assert "cannot take it" in one_line(capsys.readouterr().err)
    assert H.main([*net, "--analyse"]) == 2
    assert "--analyse" in one_line(capsys.readouterr().err)


def test_the_api_takes_any_classifier_for_the_optimisation_attacks(tutorial):
    from leakage.modules import load_module
    net = load_module(f"{tutorial}:Net", 0)
    x = torch.rand(1, *SHAPE) - 0.5
    g = torch.autograd.grad(F.cross_entropy(net(x), torch.tensor([7])), list(net.parameters()))
    result = H.attack(net, g, SHAPE, attacks=("idlg",), dlg_iters=1)
    assert result["idlg"].label == 7 and result["idlg"].x.shape == (1, *SHAPE)
    with pytest.raises(UserError, match="rgap: .*ReLU"):
        H.attack(net, g, SHAPE, attacks=("rgap", "dlg"))


# -- Fingerprints: what a gradient given as one image's looks like ---------------------------

@pytest.fixture(scope="module")
def lenet():
    model = build_net("12k5s2p2b-sigmoid,12k5s2p2b-sigmoid,12k5s1p2b-sigmoid,fc-id")
    draw_uniform(model, 0.5, 0)
    return model


def gradient(model, x, y):
    return list(torch.autograd.grad(F.cross_entropy(model(x), torch.tensor(y)), list(model.parameters())))


def test_one_images_gradient_has_its_fingerprints(lenet):
    torch.manual_seed(0)
    for label in range(10):
        assert fingerprint(lenet, gradient(lenet, torch.rand(1, *SHAPE) - 0.5, [label])) is None


@pytest.mark.parametrize("what, make, says", [
    ("a batch of 4", lambda m: gradient(m, torch.rand(4, *SHAPE) - 0.5, [1, 3, 5, 7]), "batch of at least"),
    ("a batch of one label", lambda m: gradient(m, torch.rand(4, *SHAPE) - 0.5, [2, 2, 2, 2]),
     "rank above one|does not lie along"),
    ("the parameters", lambda m: [p.detach().clone() for p in m.parameters()], "own parameters"),
    ("another model's weights", lambda m: [torch.randn_like(p) for p in m.parameters()], "sums to"),
    ("a sum over 4 images", lambda m: [4 * g for g in gradient(m, torch.rand(4, *SHAPE) - 0.5, [2, 2, 2, 2])],
     "rank above one|does not lie along"),
    ("the output bias zeroed", lambda m: [*gradient(m, torch.rand(1, *SHAPE) - 0.5, [3])[:-1], torch.zeros(10)],
     "bias gradient is exactly zero"),
    ("the output weight zeroed", lambda m: [*gradient(m, torch.rand(1, *SHAPE) - 0.5, [3])[:-2],
                                            torch.zeros(10, 768), gradient(m, torch.rand(1, *SHAPE) - 0.5, [3])[-1]],
     "weight gradient is exactly zero"),
])
def test_what_is_not_one_images_gradient_is_said(lenet, what, make, says):
    torch.manual_seed(1)
    assert re.search(says, fingerprint(lenet, make(lenet)))


def test_a_captured_gradient_of_a_batch_is_said_in_one_line(lenet, tmp_path, capsys):
    torch.manual_seed(2)
    torch.save(gradient(lenet, torch.rand(4, *SHAPE) - 0.5, [1, 3, 5, 7]), tmp_path / "g.pt")
    assert H.main(["--gradient", str(tmp_path / "g.pt"), "--model", "12k5s2p2b-sigmoid,12k5s2p2b-sigmoid,"
                   "12k5s1p2b-sigmoid,fc-id", "--init", "uniform:0.5", "--model-seed", "0", "--attacks", "rgap",
                   "--quick", "--output", str(tmp_path / "out")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: --gradient")]
    assert len(warned) == 1 and "batch of at least" in warned[0]


def test_a_gradient_of_other_pixels_than_normalize_says_which(tmp_path, capsys):
    """DLG's capture code feeds [0, 1] pixels: the published -0.5 shift is the wrong space."""
    image = load_photographs([0])[0]
    model = build_model("cnn2_c1")
    torch.save(client_gradient(model, image.x + 0.5, image.label), tmp_path / "g.pt")  # [0, 1] pixels
    args = ["--gradient", str(tmp_path / "g.pt"), "--model", "cnn2_c1", "--source", "samples", "--index", "0",
            "--attacks", "rgap", "--quick"]
    assert H.main([*args, "--output", str(tmp_path / "a")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "--normalize" in line]
    assert len(warned) == 1 and "--normalize 0 1" in warned[0]
    assert H.main([*args, "--normalize", "0", "1", "--output", str(tmp_path / "b")]) == 0
    assert "--normalize" not in capsys.readouterr().err
    assert pixel_space_hint(model, image, client_gradient(model, image.x, image.label)) is None


def test_a_frozen_parameter_is_refused_up_front(tmp_path, capsys):
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n\ndef net():\n    m = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Tanh(), nn.Flatten(), "
        "nn.Linear(1800, 10))\n    m[0].weight.requires_grad_(False)\n    return m\n")
    assert H.main(["--quick", "--source", "samples", "--index", "0", "--attacks", "rgap",
                   "--model", f"{tmp_path}/net.py:net"]) == 2
    assert "'0.weight' is frozen" in one_line(capsys.readouterr().err)
