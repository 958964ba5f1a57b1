"""Datasets and shapes: every source offline, models built for the data's input and
classes, labels beyond 9, one-channel images through the attacks, the figures and the
record."""
import importlib.metadata
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import hybrid as H
from leakage import report
from leakage.console import UserError
from leakage.data import DATASETS, foolbox_files, load_files, load_test_split, normalized, to_image
from leakage.models import parse_architecture, within_random_bound
from leakage.modules import build_model, expand_models
from leakage.record import report_names
from leakage.training import crops_of_test_set
from conftest import one_line, the_folder

TEST_SOURCES = [f"{name}-test" for name in DATASETS]


def shipped_labels(name):
    """Labels as foolbox's file names give them, read here on their own."""
    pattern = re.compile(rf"{DATASETS[name].foolbox}_(\d\d)_(\d+)\.png")
    found = {int(m[1]): int(m[2]) for f in importlib.metadata.files("foolbox") if (m := pattern.fullmatch(f.name))}
    return [found[i] for i in range(20)]


@pytest.mark.parametrize("source", TEST_SOURCES)
def test_every_test_source_ships_its_first_20_images_offline(source, tmp_path):
    name = source.removesuffix("-test")
    images, where = load_test_split(source, list(range(20)), str(tmp_path / "nothing"))
    assert where == "foolbox" and [i.name for i in images] == [f"{source}:{i}" for i in range(20)]
    assert [i.label for i in images] == shipped_labels(name)
    for image in images:
        assert image.x.shape == (1, *DATASETS[name].shape)
        pixels = (image.x + 0.5) * 255
        assert float((pixels - pixels.round()).abs().max()) < 1e-4  # 8-bit, as stored
    assert len({tuple(i.x.flatten().tolist()) for i in images}) == 20
    with pytest.raises(UserError, match=f"only {re.escape(DATASETS[name].shown)}'s test images 0-19"):
        load_test_split(source, [20], str(tmp_path / "nothing"))


def test_a_one_channel_image_is_the_files_gray_values(tmp_path):
    f, _ = foolbox_files("mnist")[0]
    gray = np.asarray(Image.open(f.locate()))
    (image,), _ = load_test_split("mnist-test", [0], str(tmp_path / "nowhere"))
    assert torch.equal(image.x[0, 0], torch.as_tensor(gray / 255.0, dtype=torch.float32) - 0.5)


@pytest.mark.parametrize("shape, classes", [((1, 28, 28), 10), ((3, 32, 32), 100), ((1, 20, 36), 7)])
def test_a_model_is_built_for_the_datas_input_and_classes(shape, classes):
    model = build_model("cnn4_c2", shape=shape, classes=classes)
    assert model.shapes[0] == shape and model.layers[0].in_channels == shape[0]
    assert model.layers[-1].out_features == classes
    assert model(torch.zeros(1, *shape)).shape == (1, classes)
    c, h, w = model.shapes[-1]
    assert model.layers[-1].in_features == c * h * w


def test_the_default_shape_gives_the_published_models_weights():
    """The data's shape is a new argument: CIFAR-10's (the default) must not change a weight."""
    default, cifar = build_model("cnn4_c2"), build_model("cnn4_c2", shape=(3, 32, 32), classes=10)
    assert all(torch.equal(p, q) for p, q in zip(default.parameters(), cifar.parameters()))


def test_random_draws_are_made_for_the_datas_input():
    for text in expand_models(["random:6"], (1, 28, 28)):
        assert within_random_bound(parse_architecture(text, (1, 28, 28)), (1, 28, 28))
        assert build_model(text, shape=(1, 28, 28)).shapes[0] == (1, 28, 28)


def test_a_kernel_that_fits_32_but_not_28_is_refused_for_mnist(capsys):
    text = "2k30s1p0-tanh,fc-id"
    parse_architecture(text)  # 30 <= 32
    assert H.main(["--analyse", "--source", "mnist-test", "--index", "0", "--model", text]) == 2
    assert "larger than its padded input (28x28" in one_line(capsys.readouterr().err)


def test_an_mnist_run_records_its_shape_and_classes_and_reconstructs(tmp_path):
    assert H.main(["--quick", "--source", "mnist-test", "--index", "0", "--model", "cnn2_c2", "--attacks", "rgap",
                   "--output", str(tmp_path)]) == 0
    folder = the_folder(tmp_path)
    results = json.loads((folder / "results.json").read_text())
    assert results["config"]["input_shape"] == [1, 28, 28] and results["config"]["classes"] == 10
    (entry,) = results["runs"]
    assert entry["image"] == "mnist-test:0" and entry["rank_deficiency"] == [0]  # 784 unknowns, full rank
    assert entry["attacks"]["rgap"]["psnr"] > 60 and entry["attacks"]["rgap"]["label_correct"]
    assert np.load(folder / entry["attacks"]["rgap"]["npy"]).shape == (28, 28, 1)
    assert (folder / "comparison.png").stat().st_size > 0


def test_cifar100_labels_above_9_are_recovered(tmp_path):
    assert H.main(["--quick", "--source", "cifar100-test", "--index", "0", "--model", "cnn2_c4", "--attacks", "rgap",
                   "--output", str(tmp_path)]) == 0
    (entry,) = json.loads((the_folder(tmp_path) / "results.json").read_text())["runs"]
    assert entry["label"] == 49 and entry["attacks"]["rgap"]["label"] == 49  # apple ... mountain: fine label 49
    assert report_names({"source": "cifar100-test"}).label(49) == "label 49 (mountain)"


def test_a_digit_is_not_named_twice():
    assert report_names({"source": "mnist-test"}).label(7) == "label 7"
    assert report_names({"source": "fashion-mnist"}).label(9) == "label 9 (ankle boot)"


def test_a_label_beyond_the_classes_is_refused_and_classes_extend_it(tmp_path, capsys):
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "x.png")
    args = ["--quick", "--attacks", "rgap", "--model", "cnn2_c0", "--image", str(tmp_path / "x.png"), "--label", "12",
            "--output", str(tmp_path / "out")]
    assert H.main(args) == 2
    assert "--label 12" in one_line(capsys.readouterr().err)
    assert H.main([*args, "--classes", "20"]) == 0
    (entry,) = json.loads((the_folder(tmp_path / "out") / "results.json").read_text())["runs"]
    assert entry["label"] == 12 and entry["attacks"]["rgap"]["label"] == 12


def test_files_keep_their_size_where_the_input_shape_is_theirs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "digit.png")
    (image,) = load_files([str(tmp_path / "digit.png")], 3, (1, 28, 28))
    assert torch.equal(image.x[0, 0], torch.as_tensor(gray / 255.0, dtype=torch.float32) - 0.5)
    assert "not 28x28" not in capsys.readouterr().err
    (resized,) = load_files([str(tmp_path / "digit.png")], 3, (3, 32, 32))
    assert resized.x.shape == (1, 3, 32, 32)
    assert "not 32x32 RGB" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--input-shape", "1", "28", "28"], ["--classes", "100"]])
def test_a_shape_or_classes_the_data_gives_is_refused(flags, capsys):
    assert H.main(["--analyse", "--source", "mnist-test", "--index", "0", *flags]) == 2
    assert "no effect without --image" in one_line(capsys.readouterr().err)


def test_offline_training_on_a_test_source_uses_its_other_shipped_images(tmp_path):
    crops_of_test_set.cache_clear()
    x, y = crops_of_test_set("mnist", 3, 10)
    assert x.shape[1:] == (1, 28, 28) and set(y.tolist()) <= set(shipped_labels("mnist"))
    (attacked,), _ = load_test_split("mnist-test", [3], str(tmp_path / "nowhere"))
    assert not any(torch.equal(crop, attacked.x[0]) for crop in x)  # no crop is the whole attacked image


def test_the_figure_of_a_one_channel_run_is_gray(tmp_path):
    run = {"model": "m", "image": "mnist-test:0", "label": 7, "defence": {"spec": "none"},
           "target": {"npy": "t.npy"}, "attacks": {"rgap": {"npy": "r.npy", "psnr": 30.0, "ssim": 0.9}}}
    np.save(tmp_path / "t.npy", np.full((28, 28, 1), 0.5, np.float32))
    np.save(tmp_path / "r.npy", np.full((28, 28, 1), 0.25, np.float32))
    fig = report.plot_comparison([run], tmp_path, tmp_path / "c.png", report_names({"source": "mnist-test"}))
    (image,) = fig.subfigs[0].axes[0].get_images()
    assert image.get_array().ndim == 2 and image.get_cmap().name == "gray"


# -- --normalize: torchvision's Normalize on [0, 1] pixels ----------------------------------


def test_normalize_maps_pixels_in_and_reconstructions_back_out(tmp_path):
    (image,), _ = load_test_split("cifar10-test", [3], str(tmp_path / "nowhere"))
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    moved = normalized(image, mean, std)
    pixels = image.x + 0.5
    expected = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(moved.x, expected, atol=1e-6) and not torch.allclose(moved.x, image.x)
    np.testing.assert_allclose(to_image(moved.x, moved.normalize), to_image(image.x), atol=1e-6)


def test_a_normalised_mnist_run_reconstructs_and_records_pixels(tmp_path):
    args = ["--quick", "--source", "mnist-test", "--index", "0", "--model", "cnn2_c2", "--attacks", "rgap"]
    assert H.main([*args, "--normalize", "0.1307", "0.3081", "--output", str(tmp_path / "n")]) == 0
    assert H.main([*args, "--output", str(tmp_path / "plain")]) == 0
    (n,), (plain,) = (json.loads((the_folder(tmp_path / k) / "results.json").read_text())["runs"]
                      for k in ("n", "plain"))
    assert json.loads((the_folder(tmp_path / "n") / "results.json").read_text())["config"]["normalize"] == [
        0.1307, 0.3081]
    assert n["attacks"]["rgap"]["psnr"] > 60  # full rank: exact in any input scale
    targets = [np.load(the_folder(tmp_path / k) / e["target"]["npy"]) for k, e in (("n", n), ("plain", plain))]
    np.testing.assert_allclose(*targets, atol=1e-6)  # the record holds pixels, whatever the scale


@pytest.mark.parametrize("values, why", [(["0.5", "0.5", "1"], "give MEAN STD"), (["0.5", "0"], "stds above 0"),
                                         (["nan", "1"], "finite")])
def test_a_bad_normalisation_is_one_line(values, why, capsys):
    assert H.main(["--analyse", "--source", "cifar10-test", "--normalize", *values]) == 2
    assert why in one_line(capsys.readouterr().err)
