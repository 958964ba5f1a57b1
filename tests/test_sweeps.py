"""Sweeps: index ranges, rows as they land, summaries, resume after a kill, shards."""
import csv
import json
import shutil

import numpy as np
import pytest

import hybrid as H
from leakage import sweeps
from leakage.console import UserError
from leakage.data import image_files, load_files, parse_image_indices
from conftest import comparable, fresh_run, rows_of, run_script

SWEEP = ["--quick", "--source", "samples", "--model", "cnn2_c0", "cnn2_c4", "--index", "0,3",
         "--attacks", "rgap", "idlg", "hybrid"]
KEY = ("model", "image", "attack")


def attack_lines(stdout):
    """How many attacks a run reported finishing."""
    return sum("  SSIM " in line for line in stdout.splitlines())


@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory):
    return fresh_run(tmp_path_factory, "full", *SWEEP)


@pytest.mark.parametrize("text,expected", [
    (["3"], [3]), (["0-3"], [0, 1, 2, 3]), (["0-2,7,9"], [0, 1, 2, 7, 9]),
    (["1", "4-5"], [1, 4, 5]), (["2,2,1-2"], [2, 1]),
])
def test_index_ranges(text, expected):
    assert parse_image_indices(text) == expected


@pytest.mark.parametrize("text", [["a"], ["3-1"], ["-2"], ["1-"], ["1,,2"], ["60000"], ["0-100000000000000"],
                                  ["9" * 5000]])
def test_bad_index_ranges(text):
    with pytest.raises(UserError, match="--index"):
        parse_image_indices(text)


def test_bad_index_range_on_the_command_line(capsys):
    assert H.main(["--source", "samples", "--index", "9-3"]) == 2
    err = capsys.readouterr().err
    assert "--index: the range '9-3' is empty" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("text", ["2/2", "1", "a/3", "1/0", "²/³"])
def test_bad_shard(text, capsys):
    assert H.main(["--shard", text]) == 2
    assert f"argument --shard: '{text}': expected K/N" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_writes_a_row_per_item_and_a_true_summary(full_sweep):
    rows = rows_of(full_sweep)
    assert len(rows) == 2 * 2 * 3
    assert len({tuple(r[k] for k in KEY) for r in rows}) == len(rows)
    with (full_sweep / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 2 * 3
    for entry in summary:
        group = [r for r in rows if (r["model"], r["attack"]) == (entry["model"], entry["attack"])]
        psnr = [float(r["psnr"]) for r in group]
        assert int(entry["n"]) == 2
        assert float(entry["psnr_mean"]) == pytest.approx(np.mean(psnr))
        assert float(entry["psnr_median"]) == pytest.approx(np.median(psnr))
        assert float(entry["psnr_std"]) == pytest.approx(np.std(psnr, ddof=1))
        assert float(entry["ssim_mean"]) == pytest.approx(np.mean([float(r["ssim"]) for r in group]))
        assert float(entry["label_accuracy"]) == np.mean([r["label_correct"] == "True" for r in group])
        indices = {(r["image"], int(r["security_index"])) for r in group}  # one per image
        assert float(entry["index_mean"]) == pytest.approx(np.mean([i for _, i in indices]))
    index = int(next(r["security_index"] for r in rows if r["model"] == "cnn2_c4"))
    fraction = float(next(r["worst_layer_fraction"] for r in rows if r["model"] == "cnn2_c4"))
    summary = (full_sweep / "summary.md").read_text()
    assert f"| cnn2_c4 | {index} [{index}, {index}] | {fraction:.4f} | Hybrid | 2 |" in summary
    assert (full_sweep / "comparison.png").exists()


def killed_copy(folder, dst, n_rows):
    """`folder` as a kill during its (n_rows+1)-th row would leave it: n_rows whole rows
    and half a line in results.csv, those attacks alone in results.json, no figure."""
    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("comparison.png", "summary.*"))
    lines = (folder / "results.csv").read_text().splitlines(keepends=True)
    (dst / "results.csv").write_text("".join(lines[: 1 + n_rows]) + lines[1 + n_rows][:15])
    kept = {tuple(r[k] for k in KEY) for r in rows_of(folder)[:n_rows]}
    results = json.loads((folder / "results.json").read_text())
    for run in results["runs"]:
        run["attacks"] = {a: e for a, e in run["attacks"].items() if (run["model"], run["image"], a) in kept}
    (dst / "results.json").write_text(json.dumps(results))
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("damage", [b"", b"model,image\n\xff\xfe garbage, \"unclosed\n", None])
def test_resume_rebuilds_results_csv_from_results_json(full_sweep, tmp_path, damage):
    """results.json is the record; results.csv (emptied, garbage, or gone) is rebuilt from it."""
    folder = killed_copy(full_sweep, tmp_path / "killed", 7)
    if damage is None:
        (folder / "results.csv").unlink()
    else:
        (folder / "results.csv").write_bytes(damage)
    out = run_script(*SWEEP, "--output", str(tmp_path), "--resume", str(folder))
    assert out.returncode == 0, out.stderr
    assert len(rows_of(folder)) == 12 and comparable(rows_of(folder)) == comparable(rows_of(full_sweep))
    assert attack_lines(out.stdout) == 12 - 7  # the 7 recorded attacks were not run again


@pytest.mark.slow
@pytest.mark.parametrize("n_rows", [2, 7])
def test_killed_sweep_resumes_to_the_same_rows(full_sweep, tmp_path, n_rows):
    folder = killed_copy(full_sweep, tmp_path / "killed", n_rows)
    out = run_script(*SWEEP, "--output", str(tmp_path), "--resume", str(folder))
    assert out.returncode == 0, out.stderr
    assert sorted(tmp_path.iterdir()) == [folder]  # resumed in place
    rows = rows_of(folder)
    assert len(rows) == 12 and comparable(rows) == comparable(rows_of(full_sweep))
    assert rows[:n_rows] == rows_of(full_sweep)[:n_rows]  # what it had finished, untouched
    results = json.loads((folder / "results.json").read_text())
    assert sum(len(run["attacks"]) for run in results["runs"]) == 12
    assert len(results["resumed"]) == 1 and (folder / "comparison.png").exists()


@pytest.mark.slow
def test_shards_cover_every_item_once_and_merge_to_the_same_summary(full_sweep, tmp_path):
    for shard in ("0/2", "1/2"):
        out = run_script(*SWEEP, "--output", str(tmp_path / "shards"), "--shard", shard)
        assert out.returncode == 0, out.stderr
    shards = sorted((tmp_path / "shards").iterdir())
    parts = [rows_of(s) for s in shards]
    assert all(parts) and comparable(parts[0] + parts[1]) == comparable(rows_of(full_sweep))
    out = run_script("--merge", *map(str, shards), "--output", str(tmp_path / "merged"))
    assert out.returncode == 0, out.stderr
    (merged,) = list((tmp_path / "merged").iterdir())
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds_mean"} for r in rows]
    with (merged / "summary.csv").open() as a, (full_sweep / "summary.csv").open() as b:
        assert drop(csv.DictReader(a)) == drop(csv.DictReader(b))
    assert (merged / "comparison.png").exists()


def test_image_folder(tmp_path):
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    names = [s.name for s in load_files(image_files([str(tmp_path)]), 2)]
    assert [n.split("@")[0] for n in names] == ["file:img0.png", "file:img1.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        image_files([str(tmp_path / "empty")])


QUICK_RUN = ["--quick", "--source", "samples", "--model", "cnn2_c0", "--attacks", "rgap"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return fresh_run(tmp_path_factory, "quick", *QUICK_RUN)


@pytest.mark.slow
@pytest.mark.parametrize("change,says", [
    (["--seed", "11"], "seed 10 -> 11"),
    (["--model", "cnn2_c4"], "models ['cnn2_c0'] -> ['cnn2_c0', 'cnn2_c4']"),  # a repeated flag adds
    (["--attacks", "rgap", "hybrid"], "attacks ['rgap'] -> ['rgap', 'hybrid']"),
    (["--shard", "1/2"], "shard [0, 1] -> [1, 2]"),
])
def test_resume_refuses_another_experiment(quick_run, change, says):
    before = {p.name: p.read_bytes() for p in quick_run.iterdir()}
    out = run_script(*QUICK_RUN, *change, "--resume", str(quick_run))
    assert out.returncode == 2 and "it holds another experiment" in out.stderr and says in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in quick_run.iterdir()} == before  # nothing touched


@pytest.mark.slow
def test_resume_refuses_a_folder_that_is_not_a_run(quick_run, tmp_path):
    for folder, says in [(quick_run.parent, "not a run folder"), (tmp_path, "not a run folder")]:
        before = sorted(folder.iterdir())
        out = run_script(*QUICK_RUN, "--resume", str(folder))
        assert out.returncode == 2 and says in out.stderr, out.stderr
        assert sorted(folder.iterdir()) == before  # not even a .lock left in it


@pytest.mark.slow
def test_resume_refuses_a_results_json_that_hybrid_py_did_not_write(quick_run, tmp_path):
    results = json.loads((quick_run / "results.json").read_text())
    for foreign in ["{not json", "\udcff", json.dumps(results | {"runs": [{"model": 1}]}),
                    json.dumps(results | {"runs": [{"model": "a", "image": "b", "attacks": {"rgap": {}}}]})]:
        (tmp_path / "results.json").write_text(foreign, errors="surrogateescape")
        out = run_script(*QUICK_RUN, "--resume", str(tmp_path))
        assert out.returncode == 2 and "not one that hybrid.py wrote" in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_resume_accepts_settings_that_leave_the_numbers(quick_run):
    rows = rows_of(quick_run)
    out = run_script(*QUICK_RUN, "--threads", "2", "--jobs", "2", "--resume", str(quick_run))
    assert out.returncode == 0, out.stderr
    assert rows_of(quick_run) == rows  # it was done: nothing added


def test_a_second_run_on_a_locked_folder_is_refused(tmp_path, capsys):
    assert H.main([*QUICK_RUN, "--output", str(tmp_path)]) == 0
    (folder,) = list(tmp_path.iterdir())
    lock = sweeps.FolderLock(folder)  # as a first resume holds it
    try:
        assert H.main([*QUICK_RUN, "--resume", str(folder)]) == 2
        assert "is being written by another run" in capsys.readouterr().err
    finally:
        lock.close()


@pytest.mark.slow
def test_merge_counts_a_folder_given_twice_once(quick_run, tmp_path):
    out = run_script("--merge", str(quick_run), str(quick_run) + "/", "--output", str(tmp_path))
    assert out.returncode == 0, out.stderr
    (merged,) = list(tmp_path.iterdir())
    assert rows_of(merged) == rows_of(quick_run)


@pytest.mark.slow
def test_merge_reads_the_record_not_a_damaged_table(quick_run, tmp_path):
    damaged = shutil.copytree(quick_run, tmp_path / "damaged")
    (damaged / "results.csv").write_bytes(b"\xff\xfe,,\n\"")
    out = run_script("--merge", str(damaged), "--output", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    (merged,) = list((tmp_path / "out").iterdir())
    assert rows_of(merged) == rows_of(quick_run)
    assert len(json.loads((merged / "results.json").read_text())["runs"]) == 1


@pytest.mark.slow
def test_merge_takes_a_shard_left_without_work(quick_run, tmp_path):
    out = run_script(*QUICK_RUN, "--shard", "3/4", "--output", str(tmp_path / "empty"))
    assert out.returncode == 0, out.stderr
    (empty,) = list((tmp_path / "empty").iterdir())
    assert rows_of(empty) == [] and json.loads((empty / "results.json").read_text())["config"]
    # the same experiment but for the shard: cnn2_c0 on chelsea is shard 0/4's only pair
    first = run_script(*QUICK_RUN, "--shard", "0/4", "--output", str(tmp_path / "first"))
    assert first.returncode == 0, first.stderr
    (shard0,) = list((tmp_path / "first").iterdir())
    out = run_script("--merge", str(shard0), str(empty), "--output", str(tmp_path / "merged"))
    assert out.returncode == 0, out.stderr
    (merged,) = list((tmp_path / "merged").iterdir())
    assert comparable(rows_of(merged)) == comparable(rows_of(quick_run))


@pytest.mark.slow
def test_merge_refuses_other_experiments_and_foreign_folders(quick_run, full_sweep, tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "results.json").write_text('["not", "a run"]')
    for folders, says in [([quick_run, full_sweep], "holds another experiment"),
                          ([quick_run, tmp_path / "foreign"], "not one that hybrid.py wrote"),
                          ([quick_run, tmp_path / "nothing"], "not a run folder")]:
        out = run_script("--merge", *map(str, folders), "--output", str(tmp_path / "out"))
        assert out.returncode == 2 and says in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no folder left
