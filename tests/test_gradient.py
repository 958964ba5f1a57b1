"""A gradient captured elsewhere (--gradient FILE.pt) and the Python API (hybrid.attack,
hybrid.analyse): the file formats, every refusal, a target named or none, the label read
from the gradient, and the API on the command line's code paths."""
import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hybrid as H
from leakage.console import UserError
from leakage.data import load_test_split, to_image
from leakage.modules import build_model
from leakage.paper import client_gradient, rank_deficiency, security_index, worst_layer_fraction
from leakage.runtime import PUBLISHED_SEED, seed_everything
from conftest import one_line, the_folder
from test_modules import LENET_FILE

MNIST = (1, 28, 28)


def user_module(path):
    """The user's own import of their model file, as their FL code has it."""
    spec = importlib.util.spec_from_file_location("users_lenet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """What a researcher's few lines save: DLG's LeNet drawn uniform(-0.5, 0.5), its
    state_dict, and its gradient on MNIST test image 0 as a list and as a dict."""
    folder = tmp_path_factory.mktemp("captured")
    (folder / "lenet.py").write_text(LENET_FILE)
    torch.manual_seed(1)
    model = user_module(folder / "lenet.py").LeNet()
    for p in model.parameters():
        nn.init.uniform_(p, -0.5, 0.5)
    (image,), _ = load_test_split("mnist-test", [0], str(folder / "nothing"))
    F.cross_entropy(model(image.x), torch.tensor([image.label])).backward()
    torch.save(model.state_dict(), folder / "weights.pt")
    torch.save([p.grad for p in model.parameters()], folder / "list.pt")
    torch.save({n: p.grad for n, p in model.named_parameters()}, folder / "dict.pt")
    return folder, model, image


def attack_files(folder, gradient, output, *more):
    return H.main(["--quick", "--attacks", "rgap", "--model", f"{folder / 'lenet.py'}:LeNet", "--weights",
                   str(folder / "weights.pt"), "--gradient", str(folder / gradient), "--output", str(output), *more])


def record(output):
    folder = the_folder(output)
    return folder, json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("gradient", ["list.pt", "dict.pt"])
def test_a_captured_gradient_is_attacked_from_the_files_alone(captured, gradient, tmp_path):
    folder, _, image = captured
    assert attack_files(folder, gradient, tmp_path, "--input-shape", "1", "28", "28") == 0
    run, results = record(tmp_path)
    (entry,) = results["runs"]
    assert entry["target"] is None and entry["label"] is None and entry["image"].startswith(f"gradient:{gradient}@")
    rgap = entry["attacks"]["rgap"]
    assert rgap["label"] == image.label and rgap["psnr"] is None and rgap["label_correct"] is None
    assert entry["rank_deficiency"] == [0, 0, 0]  # full rank: R-GAP gives the image to float rounding
    recon = np.load(run / rgap["npy"])  # within 1e-3 of every pixel: about 90 dB
    assert np.abs(recon - to_image(image.x)).max() < 1e-3
    summary = (run / "summary.md").read_text()
    assert "No target was given" in summary and "not scored" in summary and "[0, 0, 0]" in summary
    assert results["config"]["gradient"] == str(folder / gradient)


def test_a_target_named_by_index_is_scored_as_the_computed_gradient_is(captured, tmp_path):
    folder, _, image = captured
    assert attack_files(folder, "dict.pt", tmp_path / "captured", "--source", "mnist-test", "--index", "0") == 0
    assert H.main(["--quick", "--attacks", "rgap", "--model", f"{folder / 'lenet.py'}:LeNet", "--weights",
                   str(folder / "weights.pt"), "--source", "mnist-test", "--index", "0",
                   "--output", str(tmp_path / "computed")]) == 0
    (theirs,), (ours,) = (record(tmp_path / name)[1]["runs"] for name in ("captured", "computed"))
    assert theirs["image"] == ours["image"] == "mnist-test:0" and theirs["gradient"].startswith("gradient:dict.pt@")
    # the user's gradient and ours differ in float rounding (oneDNN's convolutions are theirs,
    # PyTorch's own ours): at 90 dB that is a dB
    assert theirs["attacks"]["rgap"]["label_correct"] and min(e["attacks"]["rgap"]["psnr"] for e in (theirs, ours)) > 80
    pixels = [np.load(the_folder(tmp_path / name) / e["attacks"]["rgap"]["npy"])
              for name, e in (("captured", theirs), ("computed", ours))]
    assert np.abs(pixels[0] - pixels[1]).max() < 1e-3


def test_a_label_given_with_no_target_is_scored(captured, tmp_path):
    folder, _, image = captured
    assert attack_files(folder, "list.pt", tmp_path, "--input-shape", "1", "28", "28", "--label",
                        str(image.label + 1)) == 0
    (entry,) = record(tmp_path)[1]["runs"]
    assert entry["label"] == image.label + 1 and entry["attacks"]["rgap"]["label_correct"] is False


def saved(folder, name, value):
    torch.save(value, folder / name)
    return name


def bad_gradients(folder):
    """name -> (file, what its one line must say)."""
    g = torch.load(folder / "dict.pt")
    first = next(iter(g))
    return {
        "a parameter missing": (saved(folder, "missing.pt", dict(list(g.items())[:-1])), "no gradient for 'fc.0.bias'"),
        "a name that is none": (saved(folder, "extra.pt", g | {"head.weight": torch.zeros(2)}),
                                "'head.weight' is no parameter"),
        "a shape": (saved(folder, "shape.pt", g | {first: torch.zeros(12, 3, 5, 5)}),
                    "'body.0.weight' is (12, 3, 5, 5), the model's (12, 1, 5, 5)"),
        "a count": (saved(folder, "short.pt", list(g.values())[:-1]), "holds 7 tensors, and the model has 8"),
        "not finite": (saved(folder, "nan.pt", {k: v * np.nan for k, v in g.items()}), "not finite"),
        "zero": (saved(folder, "zero.pt", {k: v * 0 for k, v in g.items()}), "exactly zero"),
        "no gradient": (saved(folder, "text.pt", "hello"), "holds a str, not a gradient"),
    }


@pytest.mark.parametrize("what", ["a parameter missing", "a name that is none", "a shape", "a count", "not finite",
                                  "zero", "no gradient"])
def test_a_gradient_that_does_not_fit_is_one_line_naming_it(captured, what, tmp_path, capsys):
    folder, _, _ = captured
    file, why = bad_gradients(folder)[what]
    assert attack_files(folder, file, tmp_path / "out", "--input-shape", "1", "28", "28") == 2
    assert why in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # refused before any folder


def test_an_unreadable_gradient_file_is_one_line(captured, tmp_path, capsys):
    folder, _, _ = captured
    (tmp_path / "junk.pt").write_text("junk")
    assert attack_files(folder, tmp_path / "junk.pt", tmp_path / "out", "--input-shape", "1", "28", "28") == 2
    assert "cannot be read as saved tensors" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("flags, why", [
    (["--train-steps", "3"], "--train-steps has no effect with --gradient"),
    (["--true-label", "--input-shape", "1", "28", "28"], "--true-label with --gradient needs the true label"),
    (["--model", "cnn2_c2", "--input-shape", "1", "28", "28"], "give one --model, not 2"),
    (["--source", "mnist-test", "--index", "0", "--label", "3"], "--label has no effect with --index"),
    (["--source", "mnist-test", "--index", "0-1"], "name one image to score against, not 2"),
])
def test_a_gradient_with_flags_it_cannot_take_is_one_line(captured, flags, why, tmp_path, capsys):
    folder, _, _ = captured
    assert attack_files(folder, "dict.pt", tmp_path / "out", *flags) == 2
    assert why in one_line(capsys.readouterr().err)


class ChainOutOfOrder(nn.Module):
    """Its linear layer is declared first, so its parameters() order is not the chain's; and
    a layer it never uses, whose gradient is None."""

    def __init__(self, classes=10):
        super().__init__()
        self.fc = nn.Linear(4 * 14 * 14, classes)
        self.unused = nn.Linear(3, 3)
        self.conv = nn.Conv2d(1, 4, 4, 2, 1)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def gradient_of(model, x, label):
    F.cross_entropy(model(x), torch.tensor([label])).backward()
    return [p.grad for p in model.parameters()]


def test_a_list_is_read_in_the_modules_order_not_the_chains(captured):
    _, _, image = captured
    torch.manual_seed(0)
    model = ChainOutOfOrder()
    grads = gradient_of(model, image.x, image.label)
    assert grads[2] is None  # the unused layer's
    results = H.attack(model, grads, MNIST, attacks=("rgap",))
    assert results["rgap"].label == image.label
    assert float((results["rgap"].x - image.x).abs().max()) < 1e-3
    named = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(H.attack(model, named, MNIST, attacks=("rgap",))["rgap"].x, results["rgap"].x)


def test_the_api_gives_what_the_command_line_gives(captured, tmp_path):
    folder, model, image = captured
    assert attack_files(folder, "list.pt", tmp_path, "--input-shape", "1", "28", "28") == 0
    run, results = record(tmp_path)
    cli = np.load(run / results["runs"][0]["attacks"]["rgap"]["npy"])
    api = H.attack(model, folder / "dict.pt", MNIST, attacks=("rgap",))["rgap"]
    assert api.x.shape == (1, *MNIST) and api.label == image.label
    assert np.array_equal(to_image(api.x).astype(np.float32), cli)


def test_the_api_hands_a_label_given_to_every_attack(captured):
    _, model, image = captured
    grads = [p.grad for p in model.parameters()]
    results = H.attack(model, grads, MNIST, attacks=("rgap", "idlg"), label=3, dlg_iters=1)
    assert results["rgap"].label == results["idlg"].label == 3


def test_the_api_analyses_as_the_recursion_does(chelsea):
    """A rank-deficient module: analyse gives the string model's deficiencies and indices."""
    class Narrow(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 2, 3, 2, 1, bias=False), nn.Linear(2 * 16 * 16, 10)

        def forward(self, x):
            return self.fc(torch.flatten(torch.tanh(self.conv(x)), 1))

    seed_everything(PUBLISHED_SEED)
    module, string = Narrow(), build_model("2k3s2p1-tanh,fc-id")
    grads = client_gradient(string, chelsea.x, chelsea.label)
    found = H.analyse(module, grads, (3, 32, 32))
    deficiency = rank_deficiency(string, grads)
    assert deficiency[0] < 0 and found["rank_deficiency"] == deficiency and found["unknowns"] == [3072]
    assert found["security_index"] == security_index(deficiency)
    assert found["worst_layer_fraction"] == worst_layer_fraction(deficiency, [3072])


def test_the_api_refuses_what_the_attacks_cannot_take(captured):
    _, model, _ = captured
    grads = [p.grad for p in model.parameters()]
    with pytest.raises(UserError, match=r"'body.0.weight' is \(12, 3, 5, 5\), the model's \(12, 1, 5, 5\)"):
        H.attack(model, [torch.zeros(12, 3, 5, 5), *grads[1:]], MNIST, attacks=("rgap",))
    with pytest.raises(UserError, match="attack 'rgapp'"):
        H.attack(model, grads, MNIST, attacks=("rgapp",))
    with pytest.raises(TypeError, match="hybrid_iter"):
        H.attack(model, grads, MNIST, hybrid_iter=3)
    with pytest.raises(UserError, match="ReLU is not invertible"):
        H.attack(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(1352, 10)), grads, MNIST)


def test_cifar100_labels_above_9_are_read_from_a_captured_gradient(tmp_path):
    (image,), _ = load_test_split("cifar100-test", [0], str(tmp_path / "nothing"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 5, 2, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(12 * 16 * 16, 100))
    grads = gradient_of(model, image.x, image.label)
    assert image.label == 49 and H.attack(model, grads, (3, 32, 32), attacks=("rgap",))["rgap"].label == 49
