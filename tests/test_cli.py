"""The script as users run it: end to end, and bad input."""
import json
import math

import numpy as np
import pytest
from PIL import Image

import shutil
import hybrid as H
from leakage import report
from leakage.data import to_image
from leakage.models import MODELS
from leakage.record import report_names, rows_in
from leakage.settings import AttackSettings, Experiment
from conftest import rows_of, run_script


def load_results(folder):
    return json.loads((folder / "results.json").read_text())


def run_folder(output):
    (folder,) = [p for p in output.iterdir() if p.is_dir()]
    return folder


@pytest.mark.slow
def test_rgap_end_to_end(tmp_path):
    out = run_script("--quick", "--source", "samples", "--attacks", "rgap", "--output", str(tmp_path))
    assert out.returncode == 0, out.stderr
    folder = run_folder(tmp_path)
    assert out.stdout.startswith(f"run folder: {folder}\n")  # said when the run starts
    assert str(folder) in out.stdout.splitlines()[-1]  # and at the end
    results = load_results(folder)
    assert {"config", "versions", "device", "command", "runs"} <= set(results)
    assert results["device"] == "cpu" and results["config"]["models"] == ["cnn4_c2"]
    (run,) = results["runs"]
    assert run["model"] == "cnn4_c2" and run["image"] == "samples:chelsea" and run["label"] == 3
    assert run["rank_deficiency"][0] == 0 and run["rank_deficiency"][1] < 0  # cnn4_c2's middle layer leaves some free
    assert run["security_index"] == sum(round(r * (3 - l) / 3) for l, r in enumerate(run["rank_deficiency"]))
    rgap = run["attacks"]["rgap"]
    assert math.isfinite(rgap["psnr"]) and 10 < rgap["psnr"] < 60 and 0 < rgap["ssim"] <= 1
    assert rgap["label"] == 3 and rgap["label_correct"] and rgap["seconds"] > 0
    recon = np.load(folder / rgap["npy"])
    assert recon.shape == (32, 32, 3) and recon.min() >= 0 and recon.max() <= 1
    assert (folder / "comparison.png").stat().st_size > 10_000


@pytest.mark.slow
def test_own_image_is_exact_on_cnn2_c1_and_repeatable(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "noise.png")
    args = ["--image", str(tmp_path / "noise.png"), "--label", "3", "--model", "cnn2_c1",
            "--attacks", "rgap", "--output", str(tmp_path / "out")]
    first, second = run_script(*args), run_script(*args)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    folders = sorted(p for p in (tmp_path / "out").iterdir())
    assert len(folders) == 2  # a second run never overwrites the first
    runs = [load_results(f)["runs"][0] for f in folders]
    assert runs[0]["image"].startswith("file:noise.png@") and runs[0]["label"] == 3
    assert runs[0]["attacks"]["rgap"]["psnr"] > 60
    assert runs[0]["attacks"]["rgap"]["psnr"] == runs[1]["attacks"]["rgap"]["psnr"]
    target = np.load(folders[0] / runs[0]["target"]["npy"])
    np.testing.assert_allclose(target, rgb / 255, atol=1e-7)  # 32x32: used as stored


def test_analyse_prints_the_security_index(capsys):
    assert H.main(["--analyse", "--source", "samples", "--model", "cnn2_c4", "cnn2_c0", "--index", "0,3"]) == 0
    out = capsys.readouterr().out
    # cnn2_c4: 900 forward and 27 gradient equations on 3072 unknowns, C_out^2 = 1 of them dependent
    assert "cnn2_c4 on samples:astronaut: security index -2146" in out
    assert "cnn2_c0 on samples:chelsea: security index" in out
    assert "| cnn2_c4 | -2146.0 | -2146 | -2146 |" in out  # the table over the two images


def test_list_models(capsys):
    assert H.main(["--list-models"]) == 0
    out = capsys.readouterr().out
    assert "cnn6d" in out and "lenet" in out and len(out.splitlines()) == len(MODELS)


@pytest.mark.parametrize("args,names", [
    (["--model", "cnn9"], "unknown model 'cnn9'"),
    (["--source", "samples", "--index", "7"], "--index 7 is out of range"),
    (["--image", "/nonexistent/cat.png"], "cannot read image /nonexistent/cat.png"),
    (["--hybrid-iters", "-1"], "--hybrid-iters must be 0 or more, not -1"),
    (["--dlg-iters", "x"], "--dlg-iters must be a whole number, not 'x'"),
    (["--device", "cuda"], "--device cuda"),
    (["--label", "12", "--image", "x.png"], "--label 12"),
    (["--attacks", "magic"], "invalid choice: 'magic'"),
    (["--seed", "-1"], "a seed must be 0 or more, not -1"),
    (["--model-seed", "4294967296"], "a seed must be in 0..2^32-1"),
    (["--threads", "0"], "--threads must be 1 or more, not 0"),
    (["--train-steps", "-3"], "--train-steps must be 0 or more"),
    (["--resume", "/no/such\nfolder\u2028here"], "--resume /no/such?folder?here: no such run folder"),
    (["--restarts", "0"], "--restarts must be 1 or more"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_input_is_one_line_and_exit_2(args, names, capsys, tmp_path):
    source = [] if "--image" in args else ["--source", "samples"]  # --source has no effect with --image
    assert H.main([*source, "--output", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert names in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # no folder made


@pytest.mark.slow
def test_bad_input_from_the_shell_is_one_line_and_exit_2():
    """The same, as a user runs it (one case: the rest run in this process)."""
    out = run_script("--threads", "0")
    assert out.returncode == 2
    assert out.stderr == "hybrid.py: error: argument --threads: --threads must be 1 or more, not 0\n"


def test_compile_without_a_compiler_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert H.main(["--compile", "--source", "samples", "--attacks", "hybrid", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--compile needs a C++ compiler" in err and len(err.strip().splitlines()) == 1


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # works as root too, unlike chmod
    assert H.main(["--source", "samples", "--attacks", "rgap", "--model", "cnn2_c0",
                   "--output", str(blocker / "runs")]) == 2
    err = capsys.readouterr().err
    assert "cannot write to output folder" in err and len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder"  # nothing already written is lost


def test_unreadable_image_file(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    assert H.main(["--image", str(bad), "--attacks", "rgap", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and len(err.strip().splitlines()) == 1


def test_an_exact_reconstruction_is_shown_as_exact(tmp_path, chelsea):
    """Infinite PSNR is null in results.json and "inf" in results.csv: the figure, the
    summary and the printed line must take it."""
    target = to_image(chelsea.x).astype(np.float32)
    np.save(tmp_path / "t.npy", target)
    run = {"model": "cnn2_c1", "image": chelsea.name, "label": 3, "target": {"npy": "t.npy"},
           "defence": {"spec": "none"}, "attacks": {"rgap": {"psnr": None, "ssim": 1.0, "npy": "t.npy"}}}
    report.plot_comparison([run], tmp_path, tmp_path / "c.png", report_names())
    assert (tmp_path / "c.png").stat().st_size > 1000
    entry = {"model": "cnn2_c1", "image": chelsea.name, "security_index": 0,
             "attacks": {"rgap": {"psnr": None, "ssim": 1.0, "seconds": 1.0, "label": 3, "label_correct": True}}}
    rows = rows_in({"runs": [entry, dict(entry, image="other")]})
    assert rows[0]["psnr"] == float("inf")
    assert "| inf ± " in report.write_summary(tmp_path, rows, report_names(), {})
    assert report.format_psnr(None) == "exact" and report.format_psnr(float("inf")) == "exact"


def test_the_comparison_figure_is_as_wide_as_its_titles(tmp_path, chelsea):
    """One column of reconstructions under a long file name: the row title must fit."""
    np.save(tmp_path / "t.npy", to_image(chelsea.x).astype(np.float32))
    name = "file:" + "my_face_photographed_at_the_seaside" + "@2bdeb236c4"
    run = {"model": "cnn2_c1", "image": name, "label": 3, "target": {"npy": "t.npy"},
           "defence": {"spec": "none"}, "attacks": {"rgap": {"psnr": 20.0, "ssim": 0.5, "npy": "t.npy"}}}
    fig = report.plot_comparison([run], tmp_path, tmp_path / "c.png", report_names())
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    (title,) = [t for sub in fig.subfigs for t in [sub._suptitle] if t is not None]
    box, figure = title.get_window_extent(renderer), fig.bbox
    assert box.x0 >= figure.x0 and box.x1 <= figure.x1, (box, figure)


@pytest.mark.slow
def test_hybrid_free_is_named_to_run_and_gets_its_own_column(tmp_path):
    """The default runs the paper's five attacks; hybrid_free, named, is recorded, tabled
    and summarised under its own name, with its rule in the config."""
    assert "hybrid_free" not in Experiment().attacks and AttackSettings().correct_where == "free-at-or-above"
    assert H.main(["--quick", "--source", "samples", "--model", "cnn2_c4", "cnn2_c1", "--index", "3",
                   "--attacks", "hybrid_free", "rgap", "--correct-where", "free-here", "--output", str(tmp_path)]) == 0
    folder = run_folder(tmp_path)
    results = load_results(folder)
    assert results["config"]["correct_where"] == "free-here" and results["config"]["attacks"] == ["rgap", "hybrid_free"]
    by_model = {r["model"]: r["attacks"]["hybrid_free"] for r in results["runs"]}
    assert by_model["cnn2_c1"]["corrected_layers"] == [] and by_model["cnn2_c4"]["corrected_layers"] == [0]
    assert {r["attack"] for r in rows_of(folder)} == {"rgap", "hybrid_free"}
    assert "| Hybrid, free layers |" in (folder / "summary.md").read_text()
