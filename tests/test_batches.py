"""A client's batch (#43): B images reconstructed and paired, labels counted with repeats, the
linear attacks stepping aside, and the API."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hybrid as H
from conftest import one_line, the_folder
from leakage.console import UserError
from leakage.data import load_photographs, to_images
from leakage.labels import label_accuracies, mean_posterior, recover_labels
from leakage.metrics import matched, score
from leakage.models import build_net, draw_uniform

LENET = "12k5s2p2b-sigmoid,12k5s2p2b-sigmoid,12k5s1p2b-sigmoid,fc-id"  # DLG's, on MNIST's 1x28x28
MNIST = (1, 28, 28)
TUTORIAL = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.pool, self.conv2 = nn.Conv2d(3, 6, 5), nn.MaxPool2d(2, 2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2 = nn.Linear(400, 120), nn.Linear(120, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv2(self.pool(F.relu(self.conv1(x))))))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))
'''


@pytest.fixture
def tutorial(tmp_path):
    path = tmp_path / "tutorial.py"
    path.write_text(TUTORIAL)
    return f"{path}:Net"


def test_pairing_undoes_any_order():
    rng = np.random.default_rng(0)
    targets = rng.random((5, 8, 8, 3))
    order = [3, 0, 4, 1, 2]
    noisy = targets + 0.05 * rng.standard_normal(targets.shape)
    recons = np.empty_like(noisy)
    recons[order] = noisy  # reconstruction order[i] is image i
    assert matched(targets, recons) == order


def test_a_batch_is_reconstructed_as_b_images_each_paired_and_scored(tutorial, tmp_path, capsys):
    assert H.main(["--quick", "--dlg-iters", "3", "--cosine-iters", "10", "--source", "samples", "--index", "0-3",
                   "--batch", "4", "--model", tutorial, "--output", str(tmp_path)]) == 0
    folder = the_folder(tmp_path)
    (entry,) = json.loads((folder / "results.json").read_text())["runs"]
    assert entry["image"] == "samples:astronaut+coffee+rocket+chelsea" and entry["batch"] == 4
    assert "rank_deficiency" not in entry  # R-GAP's ranks are one image's
    targets = np.load(folder / entry["target"]["npy"])
    assert targets.shape == (4, 32, 32, 3)
    for answer in entry["attacks"].values():
        recons = np.load(folder / answer["npy"])
        assert recons.shape == targets.shape and sorted(answer["order"]) == [0, 1, 2, 3]
        assert matched(targets, recons) == [0, 1, 2, 3]  # saved in the paired order
        for i, each in enumerate(answer["images"]):  # each image scored against its paired reconstruction
            assert each["psnr"] == pytest.approx(score(targets[i], recons[i])["psnr"])
            assert each["label_correct"] == (each["label"] == entry["label"][i])
        assert answer["psnr"] == pytest.approx(np.mean([e["psnr"] for e in answer["images"]]))
        assert answer["label_correct"] == pytest.approx(np.mean([e["label_correct"] for e in answer["images"]]))
    assert "R-GAP, Hybrid left out" in capsys.readouterr().out
    assert (folder / "comparison.png").stat().st_size > 0


def test_a_chain_on_a_batch_records_no_ranks(tmp_path):
    """R-GAP's recursion on a batch's gradient gives numbers of nothing: a chain model's batch
    cell holds no rank deficiency, and no index, under pruning either."""
    assert H.main(["--quick", "--dlg-iters", "2", "--source", "samples", "--index", "0-1", "--batch", "2",
                   "--model", "cnn2_c1", "--attacks", "idlg", "--defence", "none", "prune:0.5",
                   "--output", str(tmp_path)]) == 0
    for entry in json.loads((the_folder(tmp_path) / "results.json").read_text())["runs"]:
        assert "rank_deficiency" not in entry and "rank_deficiency" not in entry["defence"]
        assert entry.get("security_index") is None


def test_the_linear_attacks_step_aside_on_a_batch_by_name(capsys):
    args = ["--quick", "--source", "samples", "--index", "0-3", "--batch", "4", "--model", "cnn2_c1"]
    assert H.main([*args, "--attacks", "rgap", "hybrid"]) == 2
    assert "batch" in one_line(capsys.readouterr().err)
    assert H.main([*args[1:], "--analyse"]) == 2
    assert "--analyse with --batch 4" in one_line(capsys.readouterr().err)
    assert H.main([*args[:4], "0-2", *args[5:], "--attacks", "idlg"]) == 2  # 3 images, batches of 4
    assert "no whole number of batches" in one_line(capsys.readouterr().err)


def batch_gradient(model, x, labels):
    return list(torch.autograd.grad(F.cross_entropy(model(x), torch.tensor(labels)), list(model.parameters())))


@pytest.mark.parametrize("init", [None, 0.5])
def test_label_counts_with_repeats(init):
    """DLG's LeNet on MNIST's shape: 4 images of at most 10 classes repeat labels often. Its
    uniform(-0.5, 0.5) weights make the posterior confident, where the signs alone miss
    classes (the mean posterior is what finds them)."""
    model = build_net(LENET, 0, MNIST, 10)
    if init:
        draw_uniform(model, init, 0)
    posterior = mean_posterior(model, MNIST, ((0.5,), (1.0,)))
    torch.manual_seed(0)
    repeats = 0
    for _ in range(30):
        labels = torch.randint(10, (4,)).tolist()
        repeats += len(set(labels)) < 4
        gb = batch_gradient(model, torch.rand(4, *MNIST) - 0.5, labels)[-1]
        assert sorted(recover_labels(gb, 4, posterior)) == sorted(labels)
    assert repeats >= 10  # the test holds repeats


def test_label_accuracies_are_of_multisets():
    assert label_accuracies([1, 1, 2, 3], [1, 2, 2, 3]) == {"existence": 1.0, "number": 0.75}
    assert label_accuracies([4, 4, 4, 4], [1, 2, 2, 3]) == {"existence": 0.0, "number": 0.0}


def test_one_image_keeps_idlgs_rule():
    gb = torch.tensor([0.1, -0.9, 0.3, 0.5])
    assert recover_labels(gb, 1) == (1,)


def test_a_captured_batch_gradient_with_batch_is_no_warning(tmp_path, capsys):
    model = build_net(LENET, 0, MNIST, 10)
    draw_uniform(model, 0.5, 0)
    torch.manual_seed(3)
    torch.save(batch_gradient(model, torch.rand(4, *MNIST) - 0.5, [1, 3, 5, 7]), tmp_path / "g.pt")
    args = ["--gradient", str(tmp_path / "g.pt"), "--model", LENET, "--init", "uniform:0.5", "--model-seed", "0",
            "--source", "mnist-test", "--attacks", "idlg", "--quick", "--dlg-iters", "2"]
    assert H.main([*args, "--batch", "4", "--output", str(tmp_path / "a")]) == 0
    assert "warning: --gradient" not in capsys.readouterr().err
    (entry,) = json.loads((the_folder(tmp_path / "a") / "results.json").read_text())["runs"]
    assert sorted(entry["attacks"]["idlg"]["label"]) == [1, 3, 5, 7]
    assert np.load(the_folder(tmp_path / "a") / entry["attacks"]["idlg"]["npy"]).shape == (4, 28, 28, 1)


def test_the_api_takes_a_batch(tutorial):
    from leakage.modules import load_module
    net = load_module(tutorial, 0)
    images = load_photographs([0, 1, 2, 3])
    x = torch.cat([image.x for image in images])
    g = batch_gradient(net, x, [1, 1, 4, 7])
    result = H.attack(net, g, (3, 32, 32), attacks=("idlg",), batch=4, dlg_iters=2)["idlg"]
    assert result.x.shape == (4, 3, 32, 32) and sorted(result.label) == [1, 1, 4, 7]
    assert sorted(matched(to_images(x), to_images(result.x))) == [0, 1, 2, 3]
    given = H.attack(net, g, (3, 32, 32), attacks=("cosine",), batch=4, label=[7, 4, 1, 1], cosine_iters=2)
    assert given["cosine"].label == (7, 4, 1, 1)
    with pytest.raises(UserError, match="2 given for a batch of 4"):
        H.attack(net, g, (3, 32, 32), attacks=("idlg",), batch=4, label=[1, 2])
    with pytest.raises(UserError, match="linear attacks take one image"):
        H.attack(net, g, (3, 32, 32), attacks=("rgap", "idlg"), batch=4)


def test_one_image_is_a_batch_of_one_to_the_bit(chelsea):
    """B = 1 through the batch code is today's attack: the same dummy, the same label."""
    model = build_net("cnn2_c1")
    g = batch_gradient(model, chelsea.x, [chelsea.label])
    ours = H.attack(model, g, (3, 32, 32), attacks=("dlg", "idlg", "cosine"), dlg_iters=2, cosine_iters=3)
    batch = H.attack(model, g, (3, 32, 32), attacks=("dlg", "idlg", "cosine"), dlg_iters=2, cosine_iters=3,
                     label=[chelsea.label], batch=1)
    assert torch.equal(ours["idlg"].x, batch["idlg"].x) and isinstance(ours["dlg"].label, int)


# -- DP-SGD on a batch: Opacus's per-sample clipping --------------------------------------

DP_SETTINGS = ["dp:1:0.001", "dp:1:0.01", "dp:1:0.1", "dp:1:1"]  # every dp setting of the committed runs


@pytest.mark.parametrize("name", ["cnn2_c1", "cnn4_c2", "lenet"])
def test_opacus_dp_on_one_image_is_the_gradient_level_step(chelsea, name):
    from leakage.defences import defend, parse_defence, private_gradient
    from leakage.paper import client_gradient
    model = build_net(name)
    for spec in DP_SETTINGS:
        ours, record = private_gradient(model, chelsea.x, [chelsea.label], parse_defence(spec), 7)
        old, _ = defend(client_gradient(model, chelsea.x, chelsea.label), parse_defence(spec), 7)
        assert max(float((a - b).abs().max()) for a, b in zip(ours, old)) < 1e-6
        assert record["epsilon"] > 0 and record["delta"] == 1e-5


def test_dp_on_a_batch_clips_each_images_gradient():
    """Against an independent computation: each image's autograd gradient, clipped to C alone,
    then averaged (no noise). The images laid out channels last, as photographs are."""
    from leakage.defences import parse_defence, private_gradient
    from leakage.paper import client_gradient
    model = build_net("cnn2_c1")
    x = torch.cat([image.x for image in load_photographs([0, 1, 2, 3])])
    x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # non-contiguous, as a permuted HWC image is
    labels = [1, 1, 4, 7]
    each = [client_gradient(model, x[i:i + 1], labels[i]) for i in range(4)]
    clip = 0.5 * min(float(torch.cat([g.flatten() for g in e]).norm()) for e in each)  # every image is clipped
    clipped = [[g * min(1.0, clip / float(torch.cat([h.flatten() for h in e]).norm())) for g in e] for e in each]
    expected = [torch.stack(per).mean(0) for per in zip(*clipped)]
    ours, record = private_gradient(model, x, labels, parse_defence(f"dp:{clip}:0"), 0)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(ours, expected))
    assert record["epsilon"] is None and record["batch"] == 4  # no noise: no privacy


def test_dp_on_a_batch_runs_and_records_its_epsilon(tmp_path):
    assert H.main(["--quick", "--dlg-iters", "2", "--source", "samples", "--index", "0-1", "--batch", "2",
                   "--model", "cnn2_c1", "--attacks", "idlg", "--defence", "dp:1:1", "--output", str(tmp_path)]) == 0
    (entry,) = json.loads((the_folder(tmp_path) / "results.json").read_text())["runs"]
    assert entry["defence"]["epsilon"] == pytest.approx(4.7285, abs=1e-3) and entry["defence"]["batch"] == 2


def test_dp_on_a_batch_through_batchnorm_is_one_line(tmp_path, capsys):
    (tmp_path / "bn.py").write_text("import torch.nn as nn\n\ndef net():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), "
                                    "nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(3600, 10))\n")
    assert H.main(["--quick", "--source", "samples", "--index", "0-1", "--batch", "2", "--attacks", "idlg",
                   "--defence", "dp:1:0.1", "--model", f"{tmp_path}/bn.py:net"]) == 2
    assert "Opacus computes none through it: BatchNorm" in one_line(capsys.readouterr().err)


# -- --train-steps with --batch: the model trained on all but the batch's images -------------


def test_a_batch_trains_its_model_on_all_but_its_own_images(tmp_path):
    from leakage.data import batched, foolbox_test_set, load_test_split
    from leakage.training import CROP_POOL, crops_of_test_set, random_crops, training_data

    def crops_without(excluded):
        sources = [(i, torch.as_tensor(p).permute(2, 0, 1)[None] / 255.0, label)
                   for i, (p, label) in enumerate(foolbox_test_set("cifar10")) if i not in excluded]
        return random_crops(sources, 10, (3, 32, 32))

    (batch,) = batched(load_test_split("cifar10-test", [0, 1], str(tmp_path / "none"))[0], 2)
    x, y, data = training_data(batch, 10, str(tmp_path / "none"))
    assert data == f"{CROP_POOL} crops of CIFAR-10 test images 0-19 (foolbox's) less images 0, 1"
    expected = crops_without((0, 1))
    assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])
    crops_of_test_set.cache_clear()
    assert torch.equal(crops_of_test_set("cifar10", 0, 10)[0], crops_without((0,))[0])  # one image's, as before


def test_train_steps_with_a_batch_runs_and_records_what_it_trained_on(tmp_path):
    assert H.main(["--source", "samples", "--index", "0-1", "--batch", "2", "--train-steps", "2", "--attacks", "idlg",
                   "--quick", "--model", "cnn2_c0", "--output", str(tmp_path)]) == 0
    (entry,) = json.loads((the_folder(tmp_path) / "results.json").read_text())["runs"]
    assert entry["training"]["steps"] == 2 and "astronaut" not in entry["training"]["data"]
    assert "coffee" not in entry["training"]["data"] and "chelsea" in entry["training"]["data"]
