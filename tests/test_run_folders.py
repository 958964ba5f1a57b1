"""A run folder is data: reading, resuming, merging, upgrading or summarising one never runs
code it names (docs/output.md, "What reading a run folder can do"). Module files and
--weights files are named by their content, so that an edit between a stop and --resume, or
between shards, is refused, and the same file from another folder is the same."""
import importlib
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

import hybrid as H
from leakage.console import UserError
from leakage.data import content_hash
from leakage.modules import hashed_model_file, load_module
from leakage.paper import worst_layer_fraction
from leakage.record import rows_in, upgraded
from conftest import one_line, rows_of, the_folder

MODULE = '''
import torch.nn as nn


class Net(nn.Module):  # 1x28x28 in, 10 classes: a chain R-GAP inverts
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, stride=2, padding=2)
        self.act = nn.Sigmoid()
        self.fc = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))
'''
RUN = ["--quick", "--source", "mnist-test", "--index", "0-1", "--attacks", "rgap"]
STUDY_SCRIPTS = {  # every study script that reads a record named on its command line: its argv
    "study_table": ["{r}", "{r}"], "heldout_table": ["{r}", "{r}"], "variant_table": ["{r}"],
    "convergence_table": ["{r}"], "defence_table": ["{r}"], "peers_table": ["{r}"],
    "projected_study": ["{r}", "--study", "{r}"], "benchmark_table": ["{r}", "1", "{r}", "1"],
    "figures": ["{r}", "{out}/i.png", "{out}/f.png"], "noise_gain": ["{r}", "--draws", "1"]}


def module_file(folder, text=MODULE, name="net.py"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def shards(tmp_path, *extra, model=None, weights=None, ks=(0, 1)):
    """The run in two shards, each its own folder: [shard 0/2, shard 1/2] (those of `ks`)."""
    model = model or module_file(tmp_path / "code")
    folders = []
    for k in ks:
        out = tmp_path / f"shard{k}"
        args = [*RUN, "--model", f"{model}:Net", "--shard", f"{k}/2", "--output", str(out), *extra]
        assert H.main(args + (["--weights", str(weights)] if weights else [])) == 0
        folders.append(the_folder(out))
    return folders


@pytest.fixture(scope="module")
def shard_folders(tmp_path_factory):
    return shards(tmp_path_factory.mktemp("module"))


def with_payload(folder, marker, payload):
    """The folder as a record from before module files were named by content could name
    one: its entries name PAYLOAD/payload.py:Net, a file shipped with the shards that writes
    `marker` when it is imported (and then defines the same module), and state no unknowns,
    no architecture and no worst layer's fraction, which an older reader computed by
    importing the file."""
    (payload / "payload.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + MODULE)
    payload = f"{payload}/payload.py:Net"
    results = json.loads((folder / "results.json").read_text())
    results["config"]["models"] = [payload]
    for entry in results["runs"]:
        entry["model"] = payload
        for key in ("unknowns", "worst_layer_fraction", "architecture"):
            entry.pop(key, None)
    (folder / "results.json").write_text(json.dumps(results))
    grid = json.loads((folder / "grid.json").read_text())
    for cell in grid["cells"]:
        cell["key"][0] = payload
    (folder / "grid.json").write_text(json.dumps(grid))
    return folder


@pytest.fixture
def payload_shards(shard_folders, tmp_path):
    marker = tmp_path / "marker"
    return [with_payload(shutil.copytree(f, tmp_path / f"shard{k}" / f.name), marker, tmp_path)
            for k, f in enumerate(shard_folders)], marker


def test_merging_resuming_and_reading_a_record_never_import_the_module_it_names(payload_shards, tmp_path, capsys):
    folders, marker = payload_shards
    assert H.main(["--merge", *map(str, folders), "--output", str(tmp_path / "merged")]) == 0
    merged = json.loads((the_folder(tmp_path / "merged") / "results.json").read_text())
    assert len(merged["runs"]) == 2 and all(e["worst_layer_fraction"] is None for e in merged["runs"])
    assert all(e["security_index"] is not None for e in merged["runs"])  # it needs the ranks alone
    assert "its worst layer's fraction stays unknown" in capsys.readouterr().err  # said, not silent
    assert H.main([*RUN, "--model", "cnn2_c0", "--resume", str(folders[0])]) == 2  # another experiment
    rows = rows_in(json.loads((folders[1] / "results.json").read_text()))
    assert len(rows) == 1 and rows[0]["worst_layer_fraction"] is None
    assert not marker.exists()


@pytest.mark.parametrize("script", sorted(STUDY_SCRIPTS))
def test_no_study_script_imports_the_module_a_record_names(payload_shards, script, tmp_path):
    (folder, _), marker = payload_shards
    argv = [a.format(r=folder / "results.json", out=tmp_path) for a in STUDY_SCRIPTS[script]]
    try:  # what each makes of a record of one module is its own affair; that it runs nothing is ours
        importlib.import_module(f"studies.{script}").main(argv)
    except SystemExit:
        pass
    except Exception:  # noqa: S110 (a script that fails on this record still read it)
        pass
    assert not marker.exists()


def test_an_older_module_entry_takes_its_unknowns_from_its_recorded_architecture(shard_folders):
    results = json.loads((shard_folders[0] / "results.json").read_text())
    (entry,) = results["runs"]
    fraction = entry.pop("worst_layer_fraction")
    del entry["unknowns"]
    entry["model"] = "elsewhere/net.py:Net"  # as an older record names it: never read
    assert upgraded(results)["runs"][0]["worst_layer_fraction"] == fraction
    entry.pop("worst_layer_fraction")
    entry["architecture"] = "4k5x3s2p2b-sigmoid,fc-id"  # words the grammar does not read: unknown, not guessed
    assert upgraded(results)["runs"][0]["worst_layer_fraction"] is None


def test_a_record_states_each_layers_unknowns_and_names_a_module_by_its_content(shard_folders):
    entry = json.loads((shard_folders[0] / "results.json").read_text())["runs"][0]
    digest = content_hash(MODULE.encode())
    assert entry["model"] == f"net.py:Net@{digest}"  # no folder: the same file from any folder
    assert entry["unknowns"] == [1 * 28 * 28]  # the conv's input: R-GAP's one system
    assert entry["worst_layer_fraction"] == worst_layer_fraction(entry["rank_deficiency"], entry["unknowns"])


def test_an_edited_module_file_is_refused_on_resume_and_on_merge(tmp_path, capsys):
    code = module_file(tmp_path / "code")
    (first,) = shards(tmp_path, model=code, ks=(0,))
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    code.write_text(MODULE + "# edited\n")
    assert H.main([*RUN, "--model", f"{code}:Net", "--shard", "0/2", "--resume", str(first)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "the module file net.py:Net" in err and "has changed since" in err
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # nothing touched
    assert H.main([*RUN, "--model", f"{code}:Net", "--shard", "1/2", "--output", str(tmp_path / "edited")]) == 0
    capsys.readouterr()
    assert H.main(["--merge", str(first), str(the_folder(tmp_path / "edited")), "--output",
                   str(tmp_path / "merged")]) == 2
    assert "the module file net.py:Net" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "merged").exists() or not list((tmp_path / "merged").iterdir())


def test_the_same_module_file_from_another_folder_resumes(shard_folders, tmp_path):
    elsewhere = module_file(tmp_path / "elsewhere" / "deeper")
    folder = shutil.copytree(shard_folders[0], tmp_path / "copy")
    rows = rows_of(folder)
    assert H.main([*RUN, "--model", f"{elsewhere}:Net", "--shard", "0/2", "--resume", str(folder)]) == 0
    assert rows_of(folder) == rows  # it was done: nothing added


def test_a_module_file_edited_during_a_run_is_refused_by_the_next_cell(tmp_path):
    code = module_file(tmp_path / "code")
    spec = hashed_model_file(f"{code}:Net")
    assert load_module(spec, 0)  # as the run began
    code.write_text(MODULE + "# edited\n")
    with pytest.raises(UserError, match="has changed since the run began"):
        load_module(spec, 0)


def test_an_overwritten_weights_file_is_refused_on_resume_and_on_merge(tmp_path, capsys):
    code = module_file(tmp_path / "code")
    weights = tmp_path / "w.pt"
    torch.save(load_module(f"{code}:Net", 1).state_dict(), weights)
    (first,) = shards(tmp_path, model=code, weights=weights, ks=(0,))
    torch.save(load_module(f"{code}:Net", 2).state_dict(), weights)  # another model's weights, same file
    assert H.main([*RUN, "--model", f"{code}:Net", "--weights", str(weights), "--shard", "0/2",
                   "--resume", str(first)]) == 2
    assert "its --weights file was w.pt@" in one_line(capsys.readouterr().err)
    assert H.main([*RUN, "--model", f"{code}:Net", "--weights", str(weights), "--shard", "1/2",
                   "--output", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    assert H.main(["--merge", str(first), str(the_folder(tmp_path / "other")), "--output",
                   str(tmp_path / "merged")]) == 2
    assert "its --weights file was w.pt@" in one_line(capsys.readouterr().err)
    (tmp_path / "copy").mkdir()
    torch.save(load_module(f"{code}:Net", 1).state_dict(), tmp_path / "copy" / "w.pt")  # the first, elsewhere
    assert H.main([*RUN, "--model", f"{code}:Net", "--weights", str(tmp_path / "copy" / "w.pt"), "--shard", "0/2",
                   "--resume", str(first)]) == 0


class Payload:
    """A pickle that writes a marker when it is loaded (torch.load with weights_only=False would)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_array_named_by_a_record_is_never_unpickled(shard_folders, tmp_path, capsys):
    folder = shutil.copytree(shard_folders[0], tmp_path / "pickled")
    marker = tmp_path / "marker"
    entry = json.loads((folder / "results.json").read_text())["runs"][0]
    np.save(folder / entry["attacks"]["rgap"]["npy"], np.array([Payload(marker)], dtype=object), allow_pickle=True)
    assert H.main(["--merge", str(folder), "--partial", "--output", str(tmp_path / "merged")]) == 2
    assert "is missing or damaged" in one_line(capsys.readouterr().err)  # numpy refuses it: allow_pickle=False
    assert pickle.loads(pickle.dumps(Payload(tmp_path / "check"))) and (tmp_path / "check").exists()  # it would run
    assert not marker.exists()


@pytest.mark.parametrize("flag", ["--weights", "--gradient"])
def test_a_hostile_pickle_given_as_weights_or_a_gradient_is_refused_unrun(flag, tmp_path, capsys):
    marker, hostile = tmp_path / "marker", tmp_path / "hostile.pt"
    torch.save({"conv.weight": Payload(marker)}, hostile)  # torch.save pickles it whole
    code = module_file(tmp_path / "code")
    assert H.main(["--analyse", "--source", "mnist-test", "--index", "0", "--model", f"{code}:Net",
                   flag, str(hostile)]) == 2
    assert "objects other than tensors are not loaded" in one_line(capsys.readouterr().err)  # weights_only=True
    assert not marker.exists()


def test_a_grid_written_before_cells_were_called_so_still_reads(shard_folders, tmp_path):
    folder = shutil.copytree(shard_folders[0], tmp_path / "older")
    grid = json.loads((folder / "grid.json").read_text())
    (folder / "grid.json").write_text(json.dumps({"units": grid["cells"]}))  # its word before #42
    rows = rows_of(folder)
    assert H.main([*RUN, "--model", f"{shard_folders[0].parent.parent / 'code' / 'net.py'}:Net", "--shard", "0/2",
                   "--resume", str(folder)]) == 0
    assert rows_of(folder) == rows
