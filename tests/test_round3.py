"""Bad input and faults, third round: nothing pooled, stale or trusted blindly.

Each test names the class of fault it checks (the issue's numbering); the fix is at the
class's root, which the closing note names."""
import fcntl
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import hybrid as H
from leakage import report, sweeps
from leakage.data import read_image
from leakage.defences import parse_defence
from leakage.modules import expand_models, model_stem
from leakage.record import report_names, rows_in, run_metadata
from leakage.settings import AttackSettings, Experiment
from conftest import QUICK, ROOT, one_line, rows_of, the_folder

# -- 1. A figure never pools different defences ---------------------------------------------


def test_two_dp_specs_of_one_noise_std_are_two_curves_not_one_mean(tmp_path):
    """dp:1:0.001 and dp:0.001:1 add noise of one std, Z C: two defences, drawn apart."""
    scored = lambda p: {"psnr": p, "ssim": 0.5, "seconds": 1.0, "label": 3, "label_correct": True}  # noqa: E731
    runs = [{"model": "m", "image": "i", "defence": {"spec": s}, "attacks": {"rgap": scored(p)}}
            for s, p in [("none", 31.0), ("dp:1:0.001", 29.9), ("dp:0.001:1", 5.2)]]
    rows = rows_in({"runs": runs})
    fig = report.plot_defence_vs_quality(rows, tmp_path / "d.png", report_names())
    (panel,) = [ax for ax in fig.axes if ax.get_title() == "dp" and ax.get_ylabel() == "PSNR (dB)"]
    drawn = sorted(float(y) for line in panel.lines for y in line.get_ydata())
    assert 17.55 not in [round(y, 2) for y in drawn]  # the mean of the two, which no defence produced
    assert {29.9, 5.2} <= set(drawn)
    labels = [line.get_label() for line in panel.lines]
    assert len(labels) == 2 and labels[0] != labels[1]  # each clip C its own line, named


# -- 2. A resume trusts nothing the record says -----------------------------------------------


@pytest.fixture(scope="module")
def one_cell(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert H.main([*QUICK, "--model", "cnn2_c4", "--index", "3", "--output", str(out)]) == 0
    return the_folder(out)


def tampered(one_cell, tmp_path, change):
    folder = shutil.copytree(one_cell, tmp_path / "copy")
    results = json.loads((folder / "results.json").read_text())
    change(results)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.mark.parametrize("change", [
    lambda r: r["runs"].append(dict(r["runs"][0], model="cnn2_c1")),  # a model the command never names
    lambda r: r["runs"].append(json.loads(json.dumps(r["runs"][0]))),  # the same cell twice
    lambda r: r["runs"][0]["attacks"]["rgap"].update(psnr="abc"),  # a number that is a string
    lambda r: r["runs"][0]["attacks"]["rgap"].update(label_correct="yes"),
    lambda r: r["runs"][0].update(rank_deficiency="x"),
], ids=["stranger", "duplicate", "psnr-string", "label-string", "ranks-string"])
def test_a_resume_refuses_a_record_it_did_not_write_before_taking_the_lock(one_cell, tmp_path, change, capsys):
    folder = tampered(one_cell, tmp_path, change)
    before = (folder / "results.json").read_text(), (folder / "results.csv").read_text()
    assert H.main([*QUICK, "--model", "cnn2_c4", "--index", "3", "--resume", str(folder)]) == 2
    assert "--resume" in one_line(capsys.readouterr().err)
    assert ((folder / "results.json").read_text(), (folder / "results.csv").read_text()) == before


# -- 3. A merge writes its own header ---------------------------------------------------------


SHARDED = ["--quick", "--source", "samples", "--attacks", "rgap", "--model", "cnn2_c4", "cnn2_c0", "--index", "3", "0"]


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    out = tmp_path_factory.mktemp("halves")
    for k in range(2):
        assert H.main([*SHARDED, "--shard", f"{k}/2", "--output", str(out / str(k))]) == 0
    return [the_folder(out / str(k)) for k in range(2)]


def test_a_partial_merge_merged_with_what_it_lacks_is_complete(halves, tmp_path):
    assert H.main(["--merge", str(halves[0]), "--partial", "--output", str(tmp_path / "p")]) == 0
    partial = the_folder(tmp_path / "p")
    assert json.loads((partial / "results.json").read_text())["missing"]
    assert H.main(["--merge", str(partial), str(halves[1]), "--output", str(tmp_path / "w")]) == 0
    whole = the_folder(tmp_path / "w")
    results = json.loads((whole / "results.json").read_text())
    assert "missing" not in results and "missing" not in (whole / "summary.md").read_text()
    assert results["config"]["shard"] == [0, 1] and len(rows_of(whole)) == 4


def test_a_partial_merge_resumes_with_the_full_command(halves, tmp_path):
    assert H.main(["--merge", str(halves[0]), "--partial", "--output", str(tmp_path)]) == 0
    partial = the_folder(tmp_path)
    assert H.main([*SHARDED, "--resume", str(partial)]) == 0
    assert len(rows_of(partial)) == 4
    assert "missing" not in json.loads((partial / "results.json").read_text())


# -- 4. A gradient that carries nothing is not attacked ----------------------------------------

SATURATED = "6k3s1p0-leaky999,6k3s1p0-leaky999,fc-sigmoid"  # every entry of its gradient is exactly 0


def test_an_all_zero_gradient_is_skipped_with_a_reason(tmp_path, capsys):
    assert H.main(["--quick", "--source", "samples", "--index", "3", "--model", SATURATED, "--attacks", "rgap",
                   "idlg", "--output", str(tmp_path)]) == 0
    (entry,) = json.loads((the_folder(tmp_path) / "results.json").read_text())["runs"]
    assert set(entry["skipped"]) == {"rgap", "idlg"} and "zero" in entry["skipped"]["rgap"]
    assert "attacks" not in entry and "security_index" not in entry and "rank_deficiency" not in entry


def test_analyse_refuses_an_all_zero_gradient(capsys):
    assert H.main(["--analyse", "--source", "samples", "--index", "3", "--model", SATURATED]) == 1
    assert "zero" in one_line(capsys.readouterr().err)


# -- 5. A defence that makes the gradient non-finite is refused before any folder -----------------


@pytest.mark.parametrize("spec", ["noise:1e100", "dp:1:1e100", "dp:1e100:1e10"])
def test_a_strength_beyond_float32_is_refused_before_any_folder(spec, tmp_path, capsys):
    assert H.main([*QUICK, "--model", "cnn2_c4", "--defence", spec, "--output", str(tmp_path)]) == 2
    assert f"--defence '{spec}'" in one_line(capsys.readouterr().err)
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


# -- 6. An empty path is refused, not taken as "not given" ----------------------------------------


@pytest.mark.parametrize("flag", ["--resume", "--output", "--data", "--image"])
def test_an_empty_path_is_refused_in_one_line(flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert H.main([*QUICK, "--model", "cnn2_c4", flag, ""]) == 2
    assert "empty" in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_merge_folder_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert H.main(["--merge", ""]) == 2
    assert "empty" in one_line(capsys.readouterr().err)


# -- 11. A defended grid's comparison figure names each row's defence -------------------------------


def test_the_comparison_rows_name_their_defence(tmp_path):
    assert H.main([*QUICK, "--model", "cnn2_c4", "--defence", "none", "prune:0.5", "--output", str(tmp_path)]) == 0
    results = json.loads((the_folder(tmp_path) / "results.json").read_text())
    fig = report.plot_comparison(results["runs"], the_folder(tmp_path), tmp_path / "c.png", report_names())
    titles = [sub._suptitle.get_text() for sub in fig.subfigs]
    assert len(set(titles)) == len(titles) == 2 and any("prune:0.5" in t for t in titles)
    assert any("SSIM" in ax.get_xlabel() for ax in fig.axes)


# -- 10. Versions are read without importing the libraries ----------------------------------------


def test_the_record_reads_versions_without_importing(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith(("torchvision", "skimage", "matplotlib")):
            raise RuntimeError("operator torchvision::nms does not exist")  # a mismatched install
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    header = run_metadata(Experiment(device="cpu"), AttackSettings(), sweeps.RunSettings(), [])
    assert header["versions"]["torchvision"] and header["versions"]["scikit-image"]


# -- 7. The study scripts check every input first, and refuse in one line --------------------------

TABLES = {  # script -> the arguments that make one of its committed tables, the input to damage first
    "study_table": ["INPUT", "assets/study_random.json"],
    "heldout_table": ["INPUT", "assets/study_cifar_random.json", "--images", "0-4"],
    "defence_table": ["INPUT"],
    "variant_table": ["INPUT"],
    "convergence_table": ["INPUT"],
    "noise_gain": ["INPUT"],
}
DAMAGED = {"missing": None, "empty": "", "truncated": '{"config": {}, "runs": [', "a list": "[1, 2]",
           "another program's": '{"config": {}, "runs": [{"model": 1}]}', "no runs": '{"config": {}, "runs": []}'}


@pytest.mark.parametrize("damage", list(DAMAGED))
@pytest.mark.parametrize("script", list(TABLES))
def test_a_table_script_refuses_a_damaged_input_in_one_line(script, damage, tmp_path, capsys):
    import importlib

    path = tmp_path / "results.json"
    if DAMAGED[damage] is not None:
        path.write_text(DAMAGED[damage])
    args = [str(path) if a == "INPUT" else a for a in TABLES[script]]
    assert importlib.import_module(f"studies.{script}").main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and str(path) in one_line(err)


@pytest.mark.parametrize("script", list(TABLES))
def test_a_table_script_without_its_arguments_is_one_line(script, capsys):
    import importlib

    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"studies.{script}").main([])
    assert stop.value.code == 2 and "required" in one_line(capsys.readouterr().err)


def test_a_table_of_a_run_without_the_attack_it_reads_is_refused(capsys):
    from studies import variant_table

    assert variant_table.main(["assets/study_random.json"]) == 2  # rgap and hybrid, no hybrid_free
    assert "hybrid_free" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("script, args", [
    ("make_variant.sh", ["/nonexistent/results.json", "OUT"]),
    ("make_defences.sh", ["OUT", "linear", "bogus"]),
])
def test_a_study_driver_refuses_its_inputs_before_it_runs_anything(script, args, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    done = subprocess.run(["bash", str(ROOT / "studies" / script), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2 and one_line(done.stderr)
    assert not (tmp_path / "out").exists()  # no run started


# -- 8. Messages that say what happened -------------------------------------------------------------


@pytest.mark.parametrize("source", ["cifar10-test", "samples"])
def test_an_index_beyond_every_source_does_not_speak_of_training_images_only(source, capsys):
    assert H.main([*QUICK, "--model", "cnn2_c4", "--source", source, "--index", "60000"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "60000" in err and "training images 0-49999" not in err


def test_a_flag_with_merge_is_named_as_it_is_spelled(capsys):
    assert H.main(["--merge", "a", "--defence", "noise:1"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "--defence has no effect with --merge" in err


def test_a_slope_with_an_exponent_is_told_so(capsys):
    assert H.main(["--analyse", "--source", "samples", "--model", "6k3s1p0-leaky1e-3,fc-id"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "exponent" in err and "leaky0.001" in err


def test_a_long_architectures_refusal_keeps_its_reason(capsys):
    text = ",".join(["2k3s1p1-tanh"] * 400 + ["2k3s1p1-bogus", "fc-id"])
    assert H.main(["--analyse", "--source", "samples", "--model", text]) == 2
    err = one_line(capsys.readouterr().err)
    assert "unknown activation 'bogus'" in err and len(err) < 1000


def test_two_merges_of_the_same_shards_do_not_refuse_each_other(halves, tmp_path):
    reading = sweeps.FolderLock(halves[0], shared=True)  # as a first merge holds it
    try:
        assert H.main(["--merge", *map(str, halves), "--output", str(tmp_path)]) == 0
    finally:
        reading.close()


def test_a_merge_still_refuses_a_folder_being_written(halves, tmp_path, capsys):
    writing = sweeps.FolderLock(halves[0])
    try:
        assert H.main(["--merge", *map(str, halves), "--output", str(tmp_path)]) == 2
        assert "being written" in one_line(capsys.readouterr().err)
    finally:
        writing.close()


def test_a_results_json_that_is_a_folder_is_refused_without_advice(tmp_path, capsys):
    (tmp_path / "run" / "results.json").mkdir(parents=True)
    assert H.main([*QUICK, "--model", "cnn2_c4", "--resume", str(tmp_path / "run")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "folder" in err and "retries" not in err and "--resume" in err


def limit_file_size():  # in the child: a write past 8 KiB fails as on a full disk (EFBIG, not a signal)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))


def test_an_array_that_cannot_be_written_says_why_in_the_systems_words(tmp_path):
    """The first array (12 KiB) is cut short: numpy's own writes said "N requested and M written"."""
    proc = subprocess.run([sys.executable, str(ROOT / "hybrid.py"), *QUICK, "--model", "cnn2_c0", "--index", "3",
                           "--output", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size)
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert "File too large" in line and "requested" not in line and "--resume" in line


def damaged_cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    return root


def test_a_damaged_cifar10_is_called_damaged_not_missing(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    root = damaged_cifar10(tmp_path / "data")
    assert H.main([*QUICK, "--source", "cifar10", "--model", "cnn2_c0", "--data", str(root),
                   "--output", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "damaged" in err and f"remove {root / 'cifar-10-batches-py'}/" in err and "not in" not in err


def test_a_damaged_foolbox_image_costs_its_own_index_and_says_how_to_mend_it(tmp_path, monkeypatch, capsys):
    real = read_image

    def damaged_fifth(file):
        if re.search(r"cifar10_05_\d\.png$", str(file)):
            raise OSError("broken data stream when reading image file")
        return real(file)
    monkeypatch.setattr("leakage.data.read_image", damaged_fifth)
    args = ["--quick", "--attacks", "rgap", "--model", "cnn2_c0", "--source", "cifar10-test", "--data",
            str(tmp_path / "nothing")]
    assert H.main([*args, "--index", "3", "--output", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert H.main([*args, "--index", "5", "--output", str(tmp_path / "b")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "cifar10_05_6.png" in err and "pip install --force-reinstall foolbox" in err


# -- 12. Progress in a log ----------------------------------------------------------------------


def test_a_log_shows_each_layers_progress_with_v_and_nothing_without(tmp_path, capsys):
    args = [*QUICK, "--attacks", "hybrid", "--model", "cnn2_c2", "--index", "3", "--output", str(tmp_path)]
    assert H.main(args) == 0
    assert "hybrid layer" not in capsys.readouterr().err  # stderr is no terminal here: a log
    assert H.main([*args, "-v"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if line.startswith("hybrid layer 0:") and "100/100" in line]  # its last line
    assert not [line for line in lines if "\r" in line or "\x1b" in line]  # lines, not a terminal's redraws


# -- 13. Small things ---------------------------------------------------------------------------


def test_a_run_on_an_architecture_string_has_a_short_stable_name(tmp_path):
    text = "4k3s1p0-tanh,fc-id"
    assert H.main([*QUICK, "--model", text, "--index", "3", "--output", str(tmp_path)]) == 0
    name = the_folder(tmp_path).name
    assert "," not in name and name.endswith(model_stem(text))
    assert json.loads((the_folder(tmp_path) / "results.json").read_text())["runs"][0]["architecture"] == text


def test_the_comparison_names_the_class_of_the_label(tmp_path):
    assert H.main([*QUICK, "--model", "cnn2_c4", "--index", "3", "--output", str(tmp_path)]) == 0
    results = json.loads((the_folder(tmp_path) / "results.json").read_text())
    fig = report.plot_comparison(results["runs"], the_folder(tmp_path), tmp_path / "c.png", report_names())
    assert "label 3 (cat)" in fig.subfigs[0]._suptitle.get_text()


def test_a_finished_folder_holds_no_lock(tmp_path, halves):
    assert H.main([*QUICK, "--model", "cnn2_c0", "--index", "3", "--output", str(tmp_path / "run")]) == 0
    assert not (the_folder(tmp_path / "run") / ".lock").exists()
    assert H.main(["--merge", *map(str, halves), "--output", str(tmp_path / "merged")]) == 0
    assert not any((half / ".lock").exists() for half in halves)


def test_the_last_of_two_readers_removes_the_lock(tmp_path):
    first, second = sweeps.FolderLock(tmp_path, shared=True), sweeps.FolderLock(tmp_path, shared=True)
    first.close()
    assert (tmp_path / ".lock").exists()  # the second still reads
    second.close()
    assert not (tmp_path / ".lock").exists()


def test_a_lock_counts_only_on_the_file_at_its_path(tmp_path, monkeypatch):
    """Its last holder removes .lock: a process that opened the old file just before must
    not lock that one, or two runs would each hold "the" lock of one folder."""
    real, replaced = fcntl.flock, []

    def replaced_before_the_first(handle, operation):
        if not replaced:  # the holder removes it, and another run makes a new one
            replaced.append((tmp_path / ".lock").stat().st_ino)
            (tmp_path / ".lock").unlink()
            (tmp_path / ".lock").touch()
        return real(handle, operation)
    monkeypatch.setattr(fcntl, "flock", replaced_before_the_first)
    lock = sweeps.FolderLock(tmp_path)
    try:
        assert os.fstat(lock.handle.fileno()).st_ino == os.stat(tmp_path / ".lock").st_ino
    finally:
        lock.close()


def test_the_label_is_recorded_only_for_image_files(tmp_path):
    from PIL import Image

    assert H.main([*QUICK, "--model", "cnn2_c0", "--index", "3", "--output", str(tmp_path / "data")]) == 0
    folder = the_folder(tmp_path / "data")
    assert json.loads((folder / "results.json").read_text())["config"]["label"] is None
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "x.png")
    assert H.main(["--quick", "--attacks", "rgap", "--model", "cnn2_c0", "--image", str(tmp_path / "x.png"),
                   "--label", "5", "--output", str(tmp_path / "files")]) == 0
    assert json.loads((the_folder(tmp_path / "files") / "results.json").read_text())["config"]["label"] == 5
    results = json.loads((folder / "results.json").read_text())
    results["config"]["label"] = 0  # as earlier versions recorded it
    (folder / "results.json").write_text(json.dumps(results))
    assert H.main([*QUICK, "--model", "cnn2_c0", "--index", "3", "--resume", str(folder)]) == 0


def test_an_image_file_that_is_converted_is_said_in_one_line(tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.full((50, 40), 90, np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "rgb.png")
    args = ["--quick", "--attacks", "rgap", "--model", "cnn2_c0", "--output", str(tmp_path / "out")]
    assert H.main([*args, "--image", str(tmp_path / "rgb.png")]) == 0
    assert "32x32 RGB" not in capsys.readouterr().err
    assert H.main([*args, "--image", str(tmp_path / "gray.png"), str(tmp_path / "rgb.png")]) == 0
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "32x32 RGB" in line]
    assert "1 of the 2" in line and "gray.png, 40x50 L" in line


def test_analyse_downloads_nothing_and_says_it_analyses(tmp_path, monkeypatch, capsys):
    import torchvision

    asked = []

    class Offline(torchvision.datasets.CIFAR10):
        def __init__(self, *args, download=False, **kwargs):
            asked.append(download)
            super().__init__(*args, download=False, **kwargs)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    assert H.main(["--analyse", "--model", "cnn2_c0", "--data", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert asked and True not in asked
    assert "analysing CIFAR-10 test image cifar10-test:3" in one_line(err) and "attacking" not in err


# -- 9. One defence, one model, one spelling -----------------------------------------------------


def test_spellings_of_one_defence_are_one_cell(tmp_path):
    assert H.main([*QUICK, "--model", "cnn2_c4", "--index", "3", "--defence", "noise:0.01", "noise:1e-2",
                   "noise:0.01 ", "--output", str(tmp_path)]) == 0
    results = json.loads((the_folder(tmp_path) / "results.json").read_text())
    assert [e["defence"]["spec"] for e in results["runs"]] == ["noise:1e-2"]
    assert results["config"]["defences"] == ["noise:1e-2"]


def test_the_committed_specs_are_their_own_canonical_spelling():
    for path in ["assets/defences_linear_results.json", "assets/defences_linear_bends_results.json"]:
        for spec in json.loads(open(path).read())["config"]["defences"]:
            assert parse_defence(spec).spec == spec


def test_a_zoo_models_string_and_a_slopes_spellings_are_one_model():
    assert expand_models(["cnn2_c1", "6k3s1p0-tanh,fc-id"]) == ["cnn2_c1"]
    assert expand_models(["3k3s1p0-leaky,fc-id", "3k3s1p0-leaky0.01,fc-id", "3k3s1p0-leaky.01,fc-id"]) == [
        "3k3s1p0-leaky,fc-id"]


def test_a_folder_of_another_spelling_resumes_and_merges_as_one(tmp_path):
    args = [*QUICK, "--model", "cnn2_c4", "--index", "3", "--defence", "noise:1e-2"]
    assert H.main([*args, "--output", str(tmp_path / "out")]) == 0
    folder = the_folder(tmp_path / "out")
    for name in ("results.json", "grid.json"):  # as a version that kept the spelling given wrote them
        path = folder / name
        path.write_text(path.read_text().replace("noise:1e-2", "noise:0.01"))
    assert H.main([*QUICK, "--model", "cnn2_c4", "--index", "3", "--defence", "noise:0.01", "--resume",
                   str(folder)]) == 0
    assert len(rows_of(folder)) == 1  # found done, not run again
