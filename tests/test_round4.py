"""The fourth round of bad input (#44), the classes fixed so far: labels out of range with a
captured gradient and in the API; the API's arguments checked as the flags are; the caller's
random streams left alone; a float64 model taken as the command line takes it; a --weights
FIFO refused, not waited on."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hybrid as H
from conftest import one_line
from leakage.console import UserError


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
