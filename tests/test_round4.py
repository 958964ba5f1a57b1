"""The fourth round of bad input (#44), the classes fixed so far: labels out of range with a
captured gradient and in the API; the API's arguments checked as the flags are; the caller's
random streams left alone; a float64 model taken as the command line takes it; a --weights
FIFO refused, not waited on."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune  # noqa: F401  (nn.utils.prune)

import hybrid as H
from conftest import one_line, the_folder
from leakage.console import UserError
from leakage.data import normalize_of
from leakage.models import build_net
from leakage.modules import NotAChain, read_module
from leakage.paper import rescaled


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 5, stride=2, padding=2), nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(x)).flatten(1))


@pytest.fixture
def client():
    torch.manual_seed(0)
    model, x = Small(), torch.rand(1, 1, 28, 28) - 0.5
    gradient = torch.autograd.grad(F.cross_entropy(model(x), torch.tensor([7])), model.parameters())
    return model, gradient


@pytest.mark.parametrize("label", [10, -1, True, 2.0])
def test_an_api_label_that_is_no_class_is_refused(client, label):
    with pytest.raises(UserError, match="is not a class of a model with 10"):
        H.attack(*client, (1, 28, 28), attacks=("rgap", "idlg"), label=label)


@pytest.mark.parametrize("settings, says", [
    ({"dlg_iters": -5}, "must be 0 or more"), ({"dlg_iters": "5"}, "expected a int"),
    ({"restarts": 0}, "must be 1 or more"), ({"true_label": 1}, "expected a bool"),
    ({"correct_where": "nowhere"}, "expected one of")])
def test_api_settings_are_checked_as_their_flags_are(client, settings, says):
    with pytest.raises(UserError, match=says):
        H.attack(*client, (1, 28, 28), attacks=("idlg",), **settings)


def test_api_attacks_from_a_generator_run_and_none_is_refused(client):
    results = H.attack(*client, (1, 28, 28), attacks=(a for a in ["rgap"]))
    assert list(results) == ["rgap"] and results["rgap"].label == 7
    assert list(H.attack(*client, (1, 28, 28), attacks="rgap")) == ["rgap"]
    with pytest.raises(UserError, match="none named"):
        H.attack(*client, (1, 28, 28), attacks=())


def test_attack_leaves_the_callers_random_streams_as_they_were(client):
    torch.manual_seed(123)
    np.random.seed(123)
    H.attack(*client, (1, 28, 28), attacks=("rgap",))
    after = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(after[0], torch.rand(3)) and np.array_equal(after[1], np.random.rand(3))


def test_a_float64_model_is_attacked_as_the_command_line_attacks_it(client):
    model, gradient = client
    ours = H.attack(model, gradient, (1, 28, 28), attacks=("rgap",))["rgap"].x
    double = H.attack(model.double(), [g.double() for g in gradient], (1, 28, 28), attacks=("rgap",))["rgap"].x
    assert next(model.parameters()).dtype == torch.float64  # the caller's model is left as it was
    assert torch.allclose(ours, double, atol=1e-4)


@pytest.mark.parametrize("shape", ["abc", (1, 28), (1, 28, "28"), (0, 28, 28), None])
def test_a_bad_input_shape_is_one_error(client, shape):
    with pytest.raises(UserError, match="expected \\(C, H, W\\)"):
        H.attack(*client, shape, attacks=("rgap",))


def test_a_model_on_the_meta_device_is_one_error(client):
    with torch.device("meta"):
        model = Small()
    with pytest.raises(UserError, match="meta device"):
        H.attack(model, client[1], (1, 28, 28), attacks=("rgap",))


def test_a_label_beyond_the_classes_with_a_captured_gradient_is_refused(client, tmp_path, capsys):
    model, gradient = client
    torch.save(list(gradient), tmp_path / "g.pt")
    assert H.main(["--model", "6k3s1p0-tanh,fc-id", "--gradient", str(tmp_path / "g.pt"), "--input-shape", "1", "28",
                   "28", "--label", "50", "--attacks", "rgap", "--output", str(tmp_path)]) == 2
    assert "--label 50 is not a class of a model with 10" in one_line(capsys.readouterr().err)


def test_weights_given_as_a_fifo_are_refused_not_waited_on(tmp_path, capsys):
    fifo = tmp_path / "w.pt"
    os.mkfifo(fifo)
    assert H.main(["--analyse", "--model", "cnn2_c0", "--source", "samples", "--index", "3",
                   "--weights", str(fifo)]) == 2
    assert "not a regular file" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("flag", ["--weights", "--gradient"])
@pytest.mark.parametrize("content, says", [(b"", "the file is empty (0 bytes)"),
                                           (b"# not saved tensors\n", "not a file torch.save wrote"),
                                           ("numpy", "objects other than tensors are not loaded")])
def test_a_file_that_is_not_saved_tensors_is_one_plain_line(flag, content, says, tmp_path, capsys):
    path = tmp_path / "file.pt"
    if content == "numpy":
        torch.save([np.zeros(3)], path)  # a list of numpy arrays: a pickle of numpy's own class
    else:
        path.write_bytes(content)
    args = ["--model", "cnn2_c0", "--source", "samples", "--index", "3"]
    assert H.main([*args, "--analyse", flag, str(path)] if flag == "--weights" else
                  [*args, "--attacks", "rgap", flag, str(path), "--output", str(tmp_path / "out")]) == 2
    err = one_line(capsys.readouterr().err)
    assert says in err and "\x1b" not in err and "trust" not in err and "weights_only" not in err, err


def test_a_python_file_without_a_name_is_said_so(capsys):
    assert H.main(["--analyse", "--model", "my-net.py"]) == 2
    assert "a Python file needs the name of the class or function" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("source, says", [
    ("samples", "--source samples holds 5 photographs"),
    ("mnist-test", "--source mnist-test holds 10000 images (MNIST's test set, 0-9999)")])
def test_an_index_beyond_the_source_names_the_source(source, says, capsys):
    assert H.main(["--analyse", "--source", source, "--index", "10000"]) == 2
    assert says in one_line(capsys.readouterr().err)


# -- --normalize that float32 cannot carry (item 3) ------------------------------------------


@pytest.mark.parametrize("values", [["0.5", "1e300"], ["1e10", "1"], ["0.5", "1e-300"], ["0.5", "1e-30"]])
def test_a_normalize_that_wipes_the_image_in_float32_is_refused_up_front(values, tmp_path, capsys):
    assert H.main(["--model", "cnn2_c0", "--source", "samples", "--index", "3", "--attacks", "rgap",
                   "--normalize", *values, "--output", str(tmp_path)]) == 2
    assert "float32 cannot carry the image" in one_line(capsys.readouterr().err)
    assert not any(tmp_path.iterdir())  # before any folder


@pytest.mark.parametrize("values", [[0, 1], [0.5, 1], [0.4914, 0.4822, 0.4465, 0.247, 0.243, 0.261], [0.5, 1e6]])
def test_the_usual_normalizations_pass(values):
    assert normalize_of(values, 3)


def test_an_api_normalize_is_checked_as_the_flag_is(client):
    with pytest.raises(UserError, match="float32 cannot carry"):
        H.attack(*client, (1, 28, 28), attacks=("rgap",), normalize=(0.5, 1e300))


# -- complex, integer and sparse tensors; NaN weights (items 10, 12, 14) ---------------------


def test_a_complex_gradient_is_refused_not_cast(client):
    model, gradient = client
    with pytest.raises(UserError, match="'conv.weight' is complex"):  # it was cast, then called "exactly zero"
        H.attack(model, [1j * g for g in gradient], (1, 28, 28), attacks=("rgap",))


def test_an_integer_gradient_is_said_so_in_one_line(client, capsys):
    model, gradient = client
    H.attack(model, [(g * 1e6).round().long() for g in gradient], (1, 28, 28), attacks=("rgap",))
    said = [line for line in capsys.readouterr().err.splitlines() if "not floats" in line]
    assert len(said) == 1 and "hold int64 values" in said[0], said


def test_a_sparse_gradient_is_its_dense_values(client):
    model, gradient = client
    dense = H.attack(model, gradient, (1, 28, 28), attacks=("rgap",))["rgap"].x
    sparse = H.attack(model, [g.to_sparse() for g in gradient], (1, 28, 28), attacks=("rgap",))["rgap"].x
    assert torch.equal(dense, sparse)


@pytest.mark.parametrize("change, says", [
    (lambda w: w.fill_(float("nan")), "'layers.0.weight' holds values that are not finite"),
    (lambda w: w.to(torch.complex64), "'layers.0.weight' is complex"),
    (lambda w: w.to_sparse(), None)])
def test_weights_are_read_up_front_and_named_when_wrong(change, says, tmp_path, capsys):
    state = build_net("cnn2_c0").state_dict()
    state["layers.0.weight"] = change(state["layers.0.weight"].clone())
    torch.save(state, tmp_path / "w.pt")
    code = H.main(["--analyse", "--model", "cnn2_c0", "--source", "samples", "--index", "3",
                   "--weights", str(tmp_path / "w.pt")])
    if says is None:  # sparse: the same values, read
        assert code == 0
    else:
        assert code == 2 and says in one_line(capsys.readouterr().err)


def test_a_wrong_weights_file_for_a_zoo_model_makes_no_folder(tmp_path, capsys):
    state = build_net("cnn2_c0").state_dict()
    state["bogus"] = state.pop("layers.0.weight")
    torch.save(state, tmp_path / "w.pt")
    assert H.main(["--model", "cnn2_c0", "--source", "samples", "--index", "3", "--attacks", "rgap", "--quick",
                   "--weights", str(tmp_path / "w.pt"), "--output", str(tmp_path / "out")]) == 2
    assert "has no 'layers.0.weight'" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# -- input shapes that cannot be held or scored (item 10) ------------------------------------


@pytest.mark.parametrize("given", ["--image", "--gradient"])
def test_an_input_shape_too_large_to_hold_is_one_line(given, client, tmp_path, capsys):
    torch.save(list(client[1]), tmp_path / "g.pt")
    path = str(tmp_path / "g.pt") if given == "--gradient" else "assets/default_run.png"
    assert H.main(["--model", "cnn2_c0", given, path, "--input-shape", "3", "100000", "100000", "--attacks", "rgap",
                   "--output", str(tmp_path / "out")]) == 2
    assert "one image would take 112 GiB" in one_line(capsys.readouterr().err)


def test_an_api_input_shape_too_large_to_hold_is_one_error(client):
    with pytest.raises(UserError, match="one image would take"):
        H.attack(*client, (3, 100000, 100000), attacks=("rgap",))


def test_an_image_smaller_than_ssims_window_is_refused_up_front(tmp_path, capsys):
    assert H.main(["--model", "cnn6d", "--image", "assets/default_run.png", "--input-shape", "3", "2", "2",
                   "--attacks", "rgap", "--output", str(tmp_path / "out")]) == 2
    assert "SSIM scores images of at least 7x7" in one_line(capsys.readouterr().err)


# -- modules the reader took, that failed in every cell (item 9); in-place calls (item 12) ---


class Twice(nn.Module):  # one convolution called twice: shared weights
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 1, 3, 1, 1), nn.Linear(28 * 28, 10)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(torch.sigmoid(self.conv(x)))).flatten(1))


def normed():
    model = Small()
    nn.utils.parametrizations.weight_norm(model.conv)
    return model


def pruned():
    model = Small()
    torch.nn.utils.prune.l1_unstructured(model.conv, "weight", amount=0.3)
    return model


@pytest.mark.parametrize("make, says", [
    (Twice, "Conv2d 'conv': is called twice"),
    (normed, "'conv': computes with a weight that is not its parameter"),
    (pruned, "Conv2d 'conv': computes with a weight that is not its parameter")])
def test_a_module_the_systems_cannot_hold_is_refused_by_name_and_dlg_runs(make, says, tmp_path, capsys):
    torch.manual_seed(0)
    model = make()
    with pytest.raises(UserError, match=says):
        read_module(model, (1, 28, 28))
    x = torch.rand(1, 1, 28, 28) - 0.5
    gradient = torch.autograd.grad(F.cross_entropy(model(x), torch.tensor([3])), list(model.parameters()))
    result = H.attack(model, gradient, (1, 28, 28), attacks=("idlg",), dlg_iters=2, restarts=1)["idlg"]
    assert result.label == 3 and result.x.shape == x.shape


class InPlace(Small):
    def forward(self, x):
        y = self.conv(x)
        y = y.sigmoid_()
        return self.fc(y.flatten(1))


def test_an_in_place_activation_is_read_as_the_activation(client):
    model, _ = client
    inplace = InPlace()
    inplace.load_state_dict(model.state_dict())
    chain = read_module(inplace, (1, 28, 28))
    assert isinstance(chain.acts[0], nn.Sigmoid)


def test_a_sibling_import_that_fails_names_the_folder(tmp_path, capsys):
    (tmp_path / "net.py").write_text("import helpers_of_mine\n")
    assert H.main(["--analyse", "--model", f"{tmp_path}/net.py:Net"]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"its folder, {tmp_path}, is importable" in err and "helpers_of_mine.py there" in err


# -- --batch-images: a run setting for the hybrids alone (item 13) ---------------------------


def test_a_run_resumes_at_another_batch_images(tmp_path, capsys):
    run = ["--quick", "--source", "samples", "--index", "3", "--model", "cnn2_c0", "--attacks", "hybrid",
           "--hybrid-iters", "2", "--hybrid-iters-first", "2"]
    assert H.main([*run, "--batch-images", "4", "--output", str(tmp_path)]) == 0
    folder = the_folder(tmp_path)
    before = json.loads((folder / "results.json").read_text())["runs"]
    assert H.main([*run, "--batch-images", "1", "--resume", str(folder)]) == 0, capsys.readouterr().err
    assert json.loads((folder / "results.json").read_text())["runs"] == before


def test_batch_images_without_a_hybrid_is_refused(capsys):
    assert H.main(["--quick", "--source", "samples", "--attacks", "dlg", "--batch-images", "2"]) == 2
    assert "--batch-images has no effect without hybrid or hybrid_free" in one_line(capsys.readouterr().err)


def test_help_names_every_spelling_of_a_model(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line broken inside a word
    with pytest.raises(SystemExit):
        H.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    entry = text[text.index("--model NAME [NAME ...] target"):text.index("--index I [I ...] images")]
    for spelling in ["--list-models", "architecture string", "random:N", "PATH.py:NAME", "package.module:NAME"]:
        assert spelling in entry, spelling


# -- a gradient far larger than one image's (item 6) -----------------------------------------


@pytest.mark.parametrize("scale", [1e15, 1e30])
def test_a_hugely_scaled_gradient_gives_r_gaps_image(scale):
    torch.manual_seed(0)
    net, x = build_net("cnn2_c1"), torch.rand(1, 3, 32, 32) - 0.5
    gradient = torch.autograd.grad(F.cross_entropy(net(x), torch.tensor([3])), list(net.parameters()))
    plain = H.attack(net, gradient, (3, 32, 32), attacks=("rgap",), label=3)["rgap"].x
    scaled = H.attack(net, [g * scale for g in gradient], (3, 32, 32), attacks=("rgap",), label=3)["rgap"].x
    psnr = lambda y: float(10 * torch.log10(1 / ((y - x) ** 2).mean()))  # noqa: E731
    assert psnr(plain) > 100 and psnr(scaled) > 100  # it was 11 dB at 1e15


def test_one_images_gradient_is_solved_at_its_own_scale_and_a_huge_one_by_a_power_of_two():
    g = [torch.randn(4, 3, dtype=torch.float64), torch.tensor([0.3, -0.9, 0.6], dtype=torch.float64)]
    assert rescaled(g) is g  # the published code's scale: every committed number
    big = [t * 3e15 for t in g]
    scaled = rescaled(big)
    ratio = (big[0] / scaled[0]).unique()
    assert len(ratio) == 1 and math.log2(float(ratio)).is_integer()  # exact: a power of two
    assert 0.5 < float(scaled[-1].abs().max()) <= 1


# -- a gradient of other weights of the same shapes (item 2) ---------------------------------


def stale_and_other(name: str) -> tuple:
    """A model, one image's gradient through it, the gradient through its weights one SGD step
    before (lr 0.01), and another draw's gradient: the last two keep every fingerprint."""
    torch.manual_seed(0)
    net, x = build_net(name), torch.rand(1, 3, 32, 32) - 0.5
    gradient = lambda m: torch.autograd.grad(F.cross_entropy(m(x), torch.tensor([3])), list(m.parameters()))  # noqa
    stale, own = build_net(name), gradient(net)
    with torch.no_grad():
        for p, g in zip(stale.parameters(), own):
            p.add_(0.01 * g)  # the weights before a step of SGD that ended at net's
    return net, own, gradient(stale), gradient(build_net(name, seed=1))


@pytest.mark.parametrize("name", ["cnn2_c1", "lenet"])
def test_a_gradient_of_other_weights_is_said_so_and_its_own_is_not(name, capsys):
    net, own, stale, other = stale_and_other(name)
    for gradient, doubted in [(own, False), (stale, True), (other, True)]:
        result = H.attack(net, gradient, (3, 32, 32), attacks=("rgap",))["rgap"]
        said = [line for line in capsys.readouterr().err.splitlines() if "topmost system does not hold" in line]
        assert len(said) == doubted, said
        top = [r for r in result.info["residual"] if r is not None][-1]
        assert (top > 1e-4) if doubted else (top < 1e-6)


def test_a_captured_gradient_of_stale_weights_is_said_so_on_the_command_line(tmp_path, capsys):
    net, _, stale, _ = stale_and_other("cnn2_c1")
    torch.save(list(stale), tmp_path / "g.pt")
    assert H.main(["--model", "cnn2_c1", "--gradient", str(tmp_path / "g.pt"), "--attacks", "rgap",
                   "--output", str(tmp_path / "out")]) == 0
    assert "topmost system does not hold" in capsys.readouterr().err


# -- modules held to what strings are held to (item 15) --------------------------------------


def test_a_modules_system_too_large_is_refused_by_name_for_the_linear_attacks():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 64, 3, 1, 1), nn.Linear(64 * 128 * 128, 10)

        def forward(self, x):
            return self.fc(torch.tanh(self.conv(x)).flatten(1))
    with pytest.raises(NotAChain, match="Conv2d 'conv': its linear system would take [0-9.]+ GiB"):
        read_module(Wide(), (3, 128, 128))


def test_one_module_file_in_two_spellings_runs_once(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n"
        "def Net():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 5, 2, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 16 * 16, 10))\n")
    assert H.main(["--analyse", "--source", "samples", "--index", "3", "--model", f"{tmp_path}/net.py:Net",
                   f"{tmp_path}/sub/../net.py:Net"]) == 0
    out = capsys.readouterr().out
    assert "run once" in out and out.count("security index") == 1


def test_the_printed_lines_keep_their_columns_with_a_long_module_name(tmp_path, capsys):
    (tmp_path / "a_model_file_with_a_long_name.py").write_text(
        "import torch.nn as nn\n"
        "def Net():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 5, 2, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 16 * 16, 10))\n")
    assert H.main(["--quick", "--source", "samples", "--index", "3", "--attacks", "idlg", "--output",
                   str(tmp_path / "out"), "--model", "cnn2_c0",
                   f"{tmp_path}/a_model_file_with_a_long_name.py:Net"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " iDLG " in line and "samples:" in line]
    assert len(lines) == 2 and len({line.index("samples:") for line in lines}) == 1, lines
    assert len({line.index("iDLG") for line in lines}) == 1, lines
