"""The user's image files: one name per image however it is spelled, pixels at their
true range, and hostile files and names refused in one line or taken whole."""
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hybrid as H
from leakage.console import UserError
from leakage.data import foolbox_test_set, image_files, load_files, load_test_split
from leakage.record import file_stem
from leakage.training import crops_of_test_set
from conftest import rows_of, run_script

RUN = ["--quick", "--model", "cnn2_c0", "--attacks", "rgap"]


def write_png(path, value, size=(40, 50)):
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
    return path


@pytest.mark.slow
def test_two_files_with_one_name_are_two_images(tmp_path):
    """dirA/x.png and dirB/x.png: two names, two stems, two runs, each with its own pixels."""
    for folder, value in (("dirA", 30), ("dirB", 200)):
        (tmp_path / folder).mkdir()
        write_png(tmp_path / folder / "x.png", value)
    out = run_script("--image", str(tmp_path / "dirA" / "x.png"), str(tmp_path / "dirB" / "x.png"), *RUN,
                     "--output", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    (folder,) = list((tmp_path / "out").iterdir())
    runs = json.loads((folder / "results.json").read_text())["runs"]
    assert len(runs) == 2 and len({r["image"] for r in runs}) == 2
    assert all(r["image"].startswith("file:x.png@") for r in runs)
    targets = [np.load(folder / r["target"]["npy"]) for r in runs]
    assert [round(float(t.mean()) * 255) for t in targets] == [30, 200]  # each run holds its own image
    assert sorted(r["image"] for r in rows_of(folder)) == sorted(r["image"] for r in runs)


def test_one_file_given_several_ways_is_one_image(tmp_path, monkeypatch):
    path = write_png(tmp_path / "x.png", 90)
    monkeypatch.chdir(tmp_path)
    spellings = [str(path), "x.png", "./x.png", str(tmp_path / "." / "x.png"), str(tmp_path)]
    (sample,) = load_files(image_files(spellings), 2)
    (again,) = load_files(["x.png"], 2)
    assert sample.name == again.name  # stable: a resumed run finds it again


def test_names_that_differ_only_in_punctuation_keep_apart(tmp_path):
    """'a.png' and 'a_png' used to share the stem 'a_png' and so their .npy files."""
    a = write_png(tmp_path / "a.png", 10)
    b = tmp_path / "a_png"
    write_png(tmp_path / "b.png", 250).rename(b)
    samples = load_files([str(a), str(b)], 0)
    stems = {file_stem("cnn2_c0", s) for s in samples}
    assert len(samples) == 2 and len(stems) == 2
    assert all(set(stem) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") for stem in stems)


def twins(tmp_path):
    """An 8-bit grayscale gradient and the same pixels stored in 16 bits and as floats."""
    gray8 = np.add.outer(np.arange(48), np.arange(40)).astype(np.uint8) * 2
    Image.fromarray(gray8).save(tmp_path / "gray8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # 255 * 257 = 65535
    Image.fromarray((gray8 / 255).astype(np.float32)).save(tmp_path / "gray.tif")
    return [tmp_path / n for n in ("gray8.png", "gray16.png", "gray.tif")]


def test_16_bit_and_float_images_read_as_their_8_bit_twin(tmp_path):
    eight, sixteen, floats = load_files([str(p) for p in twins(tmp_path)], 0)
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I;16")  # the case Pillow's RGB clips
    assert 0.1 < eight.x.mean() + 0.5 < 0.9  # a mid-grey picture, not white or black
    torch_close = lambda a, b: float((a - b).abs().max()) < 1e-6  # noqa: E731
    assert torch_close(sixteen.x, eight.x) and torch_close(floats.x, eight.x)


@pytest.mark.slow
def test_images_without_a_known_range_are_refused_in_one_line(tmp_path):
    Image.fromarray(np.full((8, 8), 3.5, np.float32)).save(tmp_path / "hdr.tif")
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "int32.tif")
    for name, says in (("hdr.tif", "not [0, 1]"), ("int32.tif", "no known white level")):
        out = run_script("--image", str(tmp_path / name), *RUN, "--output", str(tmp_path / "out"))
        assert out.returncode == 2 and says in out.stderr and "cannot read image" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def png_header_claiming(width, height):
    """A PNG whose header claims width x height pixels (a decompression bomb's header)."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda data: struct.pack(">I", len(data) - 4) + data + struct.pack(">I", zlib.crc32(data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(ihdr) + chunk(b"IDAT" + zlib.compress(b"\0" * 8)) + chunk(b"IEND")


@pytest.mark.slow
def test_a_decompression_bomb_is_one_line(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header_claiming(100_000, 100_000))
    out = run_script("--image", str(tmp_path / "bomb.png"), *RUN, "--output", str(tmp_path / "out"))
    assert out.returncode == 2 and "cannot read image" in out.stderr and "decompression bomb" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


@pytest.mark.slow
def test_odd_file_names_run_and_stay_on_one_line(tmp_path):
    """A name that is not UTF-8, names with a newline or a line separator, a 250-byte name:
    each attacked, shown on one line, stored under a short stem."""
    names = [os.fsdecode(b"caf\xe9.png"), "two\nlines.png", "sep\u2028arator.png", "x" * 246 + ".png"]
    for i, name in enumerate(names):
        write_png(tmp_path / name, 40 * i + 20)
    output = tmp_path / os.fsdecode(b"r\xe9sultats")  # the run folder's path is not UTF-8 either
    out = run_script("--image", *[str(tmp_path / n) for n in names], *RUN, "--output", str(output))
    assert out.returncode == 0, out.stderr
    (folder,) = list(output.iterdir())
    assert out.stdout.startswith("run folder: ") and "Traceback" not in out.stderr
    rows = rows_of(folder)
    assert len(rows) == 4 and len({r["image"] for r in rows}) == 4
    assert all(r["image"].isprintable() and len(r["image"]) < 80 for r in rows)
    assert all(len(p.name) < 120 for p in folder.iterdir())
    assert len(json.loads((folder / "results.json").read_text())["runs"]) == 4


@pytest.mark.slow
def test_resume_refuses_a_folder_whose_image_file_has_changed(tmp_path):
    """The same command, but x.png now holds another picture: resuming would mix the two."""
    path = write_png(tmp_path / "x.png", 30)
    args = ["--image", str(path), *RUN, "--output", str(tmp_path / "out")]
    assert run_script(*args).returncode == 0
    (folder,) = list((tmp_path / "out").iterdir())
    write_png(path, 31)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = run_script(*args, "--resume", str(folder))
    assert out.returncode == 2 and "was an image file changed since?" in out.stderr
    refusal = [line for line in out.stderr.strip().splitlines() if not line.startswith("warning: ")]  # 40x50: resized
    assert len(refusal) == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing touched


# -- CIFAR-10's test set, offline from foolbox's wheel ------------------------------------

FOOLBOX_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]  # CIFAR-10's first 20 test labels


def test_cifar10_test_ships_its_first_20_images_offline(tmp_path):
    nowhere = tmp_path / "a file"  # a --data that cannot hold CIFAR-10: no download is tried
    nowhere.write_text("")
    images, where = load_test_split("cifar10-test", list(range(20)), str(nowhere))
    assert where == "foolbox" and [i.name for i in images] == [f"cifar10-test:{i}" for i in range(20)]
    assert [i.label for i in images] == FOOLBOX_LABELS
    for image in images:
        pixels = (image.x + 0.5) * 255
        assert image.x.shape == (1, 3, 32, 32)
        assert float((pixels - pixels.round()).abs().max()) < 1e-4  # 8-bit, as stored
        assert -0.5 <= float(image.x.min()) and float(image.x.max()) <= 0.5
    assert len({tuple(i.x.flatten()[:50].tolist()) for i in images}) == 20
    with pytest.raises(UserError, match="only CIFAR-10's test images 0-19 ship without a download"):
        load_test_split("cifar10-test", [20], str(nowhere))


def test_a_missing_foolbox_says_what_to_install(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(UserError, match="pip install foolbox"):
        foolbox_test_set("cifar10")


DATA = Path(__file__).resolve().parents[1] / H.DATA_PATH


@pytest.mark.skipif(not (DATA / "cifar-10-batches-py").exists(), reason="CIFAR-10 is not on disk here")
def test_foolbox_images_are_torchvisions():
    import torchvision

    data = torchvision.datasets.CIFAR10(root=str(DATA), train=False, download=False)
    for i, (rgb, label) in enumerate(foolbox_test_set("cifar10")):
        assert np.array_equal(np.asarray(data[i][0]), rgb) and data[i][1] == label


def test_offline_the_default_attacks_a_cifar10_test_image_and_records_it(tmp_path, monkeypatch, capsys):
    out_of_reach = lambda source, indices, root, download: "CIFAR-10's training set is out of reach"  # noqa: E731
    monkeypatch.setattr("leakage.data.load_training_split", out_of_reach)
    assert H.main(["--quick", "--model", "cnn2_c0", "--attacks", "rgap", "--output", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "attacking CIFAR-10 test image cifar10-test:3 instead" in err
    (folder,) = list(tmp_path.iterdir())
    results = json.loads((folder / "results.json").read_text())
    assert results["config"]["source"] == "cifar10-test"
    assert [r["image"] for r in results["runs"]] == ["cifar10-test:3"] and results["runs"][0]["label"] == 0


def test_training_offline_on_cifar10_test_leaves_the_attacked_image_out(monkeypatch):
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    shipped = [(red if i == 3 else np.full((32, 32, 3), 9 * i, np.uint8), label)
               for i, label in enumerate(FOOLBOX_LABELS)]
    monkeypatch.setattr("leakage.training.foolbox_test_set", lambda name: shipped)
    monkeypatch.setattr("leakage.training.CROP_POOL", 256)
    crops_of_test_set.cache_clear()
    try:
        pure_red = lambda x: ((x[:, 0] > 0.49) & (x[:, 1:] < -0.49).all(1)).flatten(1).all(1)  # noqa: E731
        assert not pure_red(crops_of_test_set("cifar10", 3, 10)[0]).any()
        assert pure_red(crops_of_test_set("cifar10", 5, 10)[0]).any()
    finally:
        crops_of_test_set.cache_clear()


def test_the_shipped_test_images_are_writable_so_training_on_them_is_quiet():
    # torch warns (once a process) when a tensor wraps a read-only array, as PIL's are
    assert all(rgb.flags.writeable for rgb, _ in foolbox_test_set("cifar10"))
    crops_of_test_set.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            crops_of_test_set("cifar10", 3, 10)
    finally:
        crops_of_test_set.cache_clear()
