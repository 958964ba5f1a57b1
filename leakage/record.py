"""The record of a sweep: results.json's entries and rows, how an older record is read (never running
anything it names), and the Sweep handed to sweeps.py."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from leakage import report, sweeps
from leakage.activations import shown_activation
from leakage.attacks import ATTACKS, takes
from leakage.console import UserError, printable, say, warn
from leakage.data import (
    CIFAR10_CLASSES, DATASETS, PHOTOGRAPH_CLASSES, PHOTOGRAPH_SHAPE, dataset_of, to_image, to_images
)
from leakage.defences import DEFENCES, NO_DEFENCE, parse_defence
from leakage.experiment import (
    Cell, Defended, RankAnalysis, Skipped, Training, cell_key, units_of, entry_key, left_to_do, run_cells
)
from leakage.models import MODELS, architecture, layer_shapes
from leakage.modules import (
    RECORDED_MODULE, canonical_model, is_module_model, layer_unknowns, model_blocking, model_stem, model_text,
    recorded_model
)
from leakage.paper import indices_of
from leakage.runtime import code_commit, configure_process
from leakage.settings import AttackSettings, Experiment

if TYPE_CHECKING:  # annotations alone
    from leakage.data import PrivateImage
    from leakage.defences import Defence
    from leakage.experiment import Answer

# =============================================================================
# Sweeps of the experiment: the record's rows, older records, and what sweeps.py is handed
# =============================================================================

CSV_COLUMNS = ("model", "image", "defence", "attack", "label", "label_correct", "psnr", "ssim", "seconds",
               *report.INDICES)  # results.csv's: the first of each row's fields


def row(entry: dict, attack: str) -> dict:
    """One attack on one cell, as report.py reads it and results.csv writes it (CSV_COLUMNS),
    from the cell's entry in results.json. The indices are those of the equations the
    attacker has: under pruning, of the surviving ones (noise leaves every equation in place)."""
    e, defence = entry["attacks"][attack], entry["defence"]
    has = defence if "rank_deficiency" in defence else entry
    d = parse_defence(defence["spec"])
    scored = report.scored(entry)  # a captured gradient with no target: PSNR and SSIM NaN
    return {"model": entry["model"], "image": entry["image"], "defence": d.spec, "attack": attack,
            "label": e["label"], "label_correct": e["label_correct"],  # null where no label was given
            "psnr": math.nan if not scored else math.inf if e["psnr"] is None else e["psnr"],  # null: exact
            "ssim": e["ssim"] if scored else math.nan, "seconds": e["seconds"],
            **{k: has.get(k) for k in report.INDICES},
            "kind": d.kind, "strength": d.strength, "curve": curve_of(d),
            "first_activation": first_activation(entry.get("architecture") or entry["model"]),
            "fc_inputs_undetermined": defence.get("fc_inputs_undetermined", math.nan) if d.removes_equations else 0.0}


def curve_of(defence: Defence) -> str:
    """Which curve of its kind a defence lies on, as the figures name it: its parameters held
    fixed along one ("C=1" for dp:1:Z); "" for a kind of one curve."""
    kind = DEFENCES[defence.kind]
    return ", ".join(f"{p.letter}={defence.params[p.name]:g}" for p in kind.params if p.name in kind.curve)


def first_activation(text: str) -> str:
    """The activation after a model's first convolution (with a leaky ReLU's slope), from
    its name or its recorded architecture: the study figure's colour, since a leaky ReLU's
    inverse divides by its slope, so errors grow on the way down."""
    first = re.match(r"\d+k[\dx]+s[\dx]+p[\dx]+b?-([a-z]+)([0-9.]*)", MODELS.get(text, text))
    return "other" if first is None else shown_activation(first[1] + first[2])  # softplus2: softplus


RENAMED = {"indices": "image_indices", "images": "image_files"}  # config keys: older name -> this version's


def upgraded(results: dict) -> dict:
    """results.json as this version writes it, from any earlier version's (in place): the
    one place that knows older run folders. Settings renamed since (RENAMED), and an
    attack's best start (then "kept"). Before
    defences an entry had none (it is `none`'s); before the worst layer's fraction it had
    the security index alone (both indices follow from its rank deficiencies and each
    layer's unknowns).

    Reading a record runs nothing it names. An entry's unknowns are its own (`unknowns`,
    recorded since module files were named by their content) or its architecture string's;
    an older entry of a module file states neither, and its worst layer's fraction stays
    unknown (null), said once: its file is not read back."""
    config = results.get("config", {})
    for old, new in RENAMED.items():
        if old in config:
            config[new] = config.pop(old)
    if not config.get("image_files") and "label" in config:  # recorded before it was the files' alone
        config["label"] = None
    if config and "input_shape" not in config:  # before other datasets: CIFAR-10's, the photographs' or files'
        config |= {"input_shape": list(PHOTOGRAPH_SHAPE), "classes": PHOTOGRAPH_CLASSES}
    shape = config.get("input_shape")
    shape = tuple(shape) if isinstance(shape, list) and len(shape) == 3 and all(
        isinstance(n, int) and n > 0 for n in shape) else PHOTOGRAPH_SHAPE
    if isinstance(config.get("defences"), list):  # specs and models in their one spelling, as now recorded
        config["defences"] = list(dict.fromkeys(canonical_spec(d) for d in config["defences"]))
    if isinstance(config.get("models"), list):
        config["models"] = list(dict.fromkeys(canonical_name(m) for m in config["models"]))
    unstated = []
    for entry in results["runs"]:
        entry.setdefault("defence", {"spec": "none"})
        entry["defence"]["spec"] = canonical_spec(entry["defence"]["spec"])
        entry["model"] = canonical_name(entry["model"])
        for answer in entry.get("attacks", {}).values():  # a best start was recorded as "kept"
            if "kept" in answer and "starts" in answer:
                answer["best_start"] = answer.pop("kept")
        for has in (entry, entry["defence"]):
            if has.get("rank_deficiency") is not None and any(has.get(k) is None for k in report.INDICES):
                unknowns = recorded_unknowns(entry, shape)
                has |= indices_of(has["rank_deficiency"], unknowns)
                if unknowns is None:
                    unstated.append(entry["model"])
    if unstated:
        warn_once(f"{printable(unstated[0], 80)}{' and others' if len(set(unstated)) > 1 else ''}: recorded before the "
             "record stated each layer's unknowns, in words the grammar does not read, and a module file is "
             "never read back: its worst layer's fraction stays unknown")
    return results


@functools.cache  # a merge reads each folder twice (before its lock, and under it): said once a process
def warn_once(text: str) -> None:
    warn(text)


def recorded_unknowns(entry: dict, shape: tuple[int, int, int]) -> list[int] | None:
    """An entry's unknowns per layer, from the record alone: its own, or its architecture
    string's (the grammar is parsed, nothing run: a module's recorded architecture where the
    grammar reads it); None where neither states them."""
    if isinstance(entry.get("unknowns"), list):
        return entry["unknowns"]
    text = entry.get("architecture") if is_module_model(entry["model"]) else entry["model"]
    if not isinstance(text, str):  # a module's, recorded before its architecture was
        return None
    try:
        return [math.prod(s) for s in layer_shapes(architecture(text, shape), shape=shape)[:-1]]
    except UserError:  # not in the grammar's words (a KxK' kernel, a hidden fcN)
        return None


def canonical_spec(spec: str) -> str:
    """A recorded defence spec in its canonical spelling (as it was, where it no longer parses)."""
    try:
        return parse_defence(spec).spec
    except UserError:
        return spec


def canonical_name(model: str) -> str:
    """A recorded model in its canonical name (as it was, where it no longer parses; a
    module's FILE.py:NAME@HASH, or an older record's PATH.py:NAME, as it is: its file is
    never read back)."""
    if is_module_model(model):
        return model
    try:
        return canonical_model(model)
    except UserError:
        return model


def upgraded_key(key: tuple) -> tuple:
    """A grid.json key as this version names the cell: the model's and the defence's one spelling."""
    model, image, *defence = key
    return cell_key(canonical_name(model), image, canonical_spec(defence[0]) if defence else "none")


def rows_in(results: dict) -> list[dict]:
    """Every attack a results.json holds, as rows (the study scripts read committed runs so)."""
    return [row(entry, attack) for entry in upgraded(results)["runs"] for attack in entry.get("attacks", {})]


def report_names(config: dict | None = None) -> report.Names:
    """What report.py's figures and tables call the attacks and the defences (their rows'),
    and the classes of a record's data (CIFAR-10's, where it does not name them: the
    photographs, and --image files with 10 classes)."""
    paper = AttackSettings()
    return report.Names({name: (a.shown, a.marker) for name, a in ATTACKS.items()},
                        {kind: (d.axis, d.symbol) for kind, d in DEFENCES.items() if kind != "none"},
                        class_names(config or {}),
                        {k: getattr(paper, k) for k in ("dlg_iters", "cosine_iters", "hybrid_iters_first",
                                                        "hybrid_iters")})


def class_names(config: dict) -> tuple[str, ...]:
    name = dataset_of(config.get("source") or "cifar10")[0]
    if name in DATASETS and not config.get("image_files"):
        return DATASETS[name].classes
    return CIFAR10_CLASSES if config.get("classes", PHOTOGRAPH_CLASSES) == PHOTOGRAPH_CLASSES else ()


def removing_equations() -> set[str]:
    """The defence kinds whose shared zeros are missing entries: report.py's pruning figure and table."""
    return {kind for kind, d in DEFENCES.items() if d.removes_equations}


def finish(folder: sweeps.RunFolder) -> None:
    """What a sweep and a merge end with: report.py's figures and summaries."""
    report.finish(folder, report_names(folder.results.get("config")), removing_equations())


def is_entry(entry: object) -> bool:
    """A cell's entry of results.json's runs as record_event writes it (what resume, merge
    and the summaries read), every field of the type it is written with: a record that was
    edited by hand is refused, not trusted until a figure fails on a string."""
    if not (isinstance(entry, dict) and isinstance(entry.get("model"), str) and isinstance(entry.get("image"), str)):
        return False
    attacks, defence, skipped = entry.get("attacks", {}), entry.get("defence", {}), entry.get("skipped", {})
    return (isinstance(attacks, dict) and all(a in ATTACKS and is_answer(e) for a, e in attacks.items())
            and isinstance(defence, dict) and isinstance(defence.get("spec", ""), str)
            and all(has_ranks(e) for e in (entry, defence)) and has_unknowns(entry)
            and isinstance(skipped, dict) and all(isinstance(v, str) for v in skipped.values()))


def is_number(value: object, or_null: bool = False) -> bool:
    return (value is None and or_null) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def is_label(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_answer(e: object) -> bool:
    """An attack's record: its scores, time and label (a batch's: a label per image, and the
    fraction of them right), typed."""
    if not isinstance(e, dict):
        return False
    label, right = e.get("label"), e.get("label_correct")
    one = is_label(label) and (right is None or isinstance(right, bool))
    batch = (isinstance(label, list) and label and all(map(is_label, label))
             and (right is None or (is_number(right) and 0 <= right <= 1)))
    return (is_number(e.get("psnr"), or_null=True) and is_number(e.get("ssim"), or_null=True)
            and is_number(e.get("seconds")) and (one or batch) and {"psnr", "ssim", "label_correct"} <= e.keys())


def has_ranks(e: dict) -> bool:
    """Rank deficiencies and indices, where a record holds them, typed."""
    ranks = e.get("rank_deficiency")
    return ((ranks is None or (isinstance(ranks, list) and all(is_number(r) for r in ranks)))
            and all(is_number(e.get(index), or_null=True) for index in report.INDICES))


def has_unknowns(entry: dict) -> bool:
    """Each layer's unknowns, where the entry states them: positive integers, one a layer
    of its rank deficiencies."""
    unknowns, ranks = entry.get("unknowns"), entry.get("rank_deficiency")
    return unknowns is None or (isinstance(unknowns, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in unknowns)
        and (ranks is None or len(ranks) == len(unknowns)))


def file_stem(model_name: str, image: PrivateImage, defence: Defence = NO_DEFENCE) -> str:
    """Where a cell's arrays go: 'cnn4_c2_samples-chelsea', 'cnn4_c2_file-cat_png_3fa2b1c0d9',
    'cnn4_c2_cifar10-test-3_prune-0_9_<hash>'. Letters, digits, '-' and '_' only; distinct images
    keep distinct stems (a file's name ends in its hash), and so do distinct defences."""
    safe = lambda text: re.sub("[^A-Za-z0-9_-]", "_", text)  # noqa: E731
    stem = f"{model_stem(model_name)}_{safe(image.name.replace(':', '-', 1))}"
    if defence == NO_DEFENCE:
        return stem
    return f"{stem}_{safe(defence.spec.replace(':', '-'))}_{hashlib.sha256(defence.spec.encode()).hexdigest()[:6]}"


def record_event(folder: sweeps.RunFolder, cell: Cell, event: Training | RankAnalysis | Answer) -> None:
    """Write what the experiment on a cell yields into its entry: per attack, the
    reconstruction's .npy, then the record, then the row and the printed line. The
    training and the ranks go to disk with the next attack."""
    stem, shape = file_stem(cell.model, cell.image, cell.defence), cell.image.shape
    entry = folder.entry(cell.key)
    if entry is None:
        target = None  # a captured gradient with no image named: nothing to score against
        if cell.image.x is not None:
            pixels = (to_image(cell.image.x, cell.image.normalize) if cell.image.size == 1  # a batch's: (B, H, W, C)
                      else to_images(cell.image.x, cell.image.normalize)).astype(np.float32)
            target = {"npy": folder.save_array(f"{stem}_target.npy", pixels)}
        captured = {} if cell.image.captured is None else {"gradient": cell.image.captured.name}
        entry = folder.add({"model": recorded_model(cell.model), "architecture": model_text(cell.model, shape),
                            "unknowns": layer_unknowns(cell.model, shape),
                            "image": cell.image.name, "defence": {"spec": cell.defence.spec},
                            "label": cell.image.label if cell.image.size == 1 else cell.image.labels,
                            "target": target} | captured | ({"batch": cell.image.size} if cell.image.size > 1 else {}))
    if isinstance(event, Defended):  # to disk with the next attack
        defence = entry["defence"]
        defence |= event.info
        if "rank_deficiency" in event.info:
            defence |= indices_of(event.info["rank_deficiency"], entry["unknowns"])
        return
    if isinstance(event, Training):
        entry["training"] = event.info
        if event.info["diverged"]:
            warn(f"{cell.model} on {cell.image.name}: training diverged (last loss {event.info['final_loss']}); "
                 "recorded as diverged")
        return
    if isinstance(event, Skipped):
        entry.setdefault("skipped", {}).update(dict.fromkeys(event.attacks, event.why))
        folder.save()
        warn(f"{cell.model} on {cell.image.name}: {', '.join(event.attacks)} skipped: {event.why}")
        return
    if isinstance(event, RankAnalysis) or (event.attack == "rgap" and "rank_deficiency" not in entry
                                           and cell.defence == NO_DEFENCE):
        deficiency = event.deficiency if isinstance(event, RankAnalysis) else event.entry["rank_deficiency"]
        entry["rank_deficiency"] = deficiency
        entry |= indices_of(deficiency, entry["unknowns"])
    if isinstance(event, RankAnalysis):
        return
    npy = folder.save_array(f"{stem}_{event.attack}.npy", event.recon.astype(np.float32))
    e = entry.setdefault("attacks", {})[event.attack] = event.entry | {"npy": npy}
    not_finite = folder.finished(entry, event.attack)
    ssim = "nan" if e["ssim"] is None or not math.isfinite(e["ssim"]) else f"{e['ssim']:.3f}"
    shown = "" if cell.defence == NO_DEFENCE else f"{cell.defence.spec:13s} "  # which cell of the grid
    scores = (f"PSNR {report.format_psnr(e['psnr'], 2):>9s}  SSIM {ssim}" if entry["target"] is not None
              else "not scored (no target)")
    wrong = ({True: "", False: " (wrong)", None: ""}[e["label_correct"]] if not isinstance(e["label"], list)
             else "" if e["label_correct"] is None else f" ({e['label_correct']:.0%} right)")
    model_width, image_width = column_widths(str(folder.path))
    say(f"{entry['model']:{model_width}s} {cell.image.name:{image_width}s} {shown}{ATTACKS[event.attack].shown:9s}  "
        f"{scores}  label {e['label']}{wrong}  {e['seconds']:6.1f} s"
        + (f"  (not finite, recorded as null: {', '.join(not_finite)})" if not_finite else ""))


@functools.lru_cache(maxsize=8)
def column_widths(folder: str) -> tuple[int, int]:
    """The printed lines' model and image columns, as wide as the run's longest names (its
    grid.json, read once), so that a long module name keeps the columns in line."""
    try:
        cells = json.loads((Path(folder) / "grid.json").read_text(encoding="utf-8"))["cells"]
        return max([9, *(len(c["key"][0]) for c in cells)]), max([18, *(len(c["key"][1]) for c in cells)])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return 9, 18


def flat_config(exp: Experiment, settings: AttackSettings, run: sweeps.RunSettings) -> dict:
    """results.json's `config`: every setting of the run, one flat dict (the attacker's
    knowledge of a defence is the experiment's, per cell: not a setting)."""
    method = {k: v for k, v in dataclasses.asdict(settings).items() if k != "zeros_are_missing"}
    config = dataclasses.asdict(exp) | method | dataclasses.asdict(run)
    config["models"] = [recorded_model(m) for m in exp.models]  # a module by its content, not its folder
    if not exp.image_files and exp.gradient is None:  # --label is the --image files' class (or a captured
        config["label"] = None  # gradient's); the data's images carry their own
    return config


RECORD = sweeps.Record(
    key=entry_key, parts="attacks", columns=CSV_COLUMNS, row=row, is_entry=is_entry, upgrade=upgraded,
    upgrade_key=upgraded_key,
    defaults=flat_config(Experiment(), AttackSettings(), sweeps.RunSettings()),
    may_differ=frozenset({"data", "verbose", "compile", "device",  # the files' paths: grid.json holds the images
                          "image_files", "gradient", "weights",  # and the gradient themselves, by name and hash,
                          # config the weights (weights_name) and the models (a module file's FILE.py:NAME@HASH)
                          "batch_images"}),  # each image's numbers are its own, whatever its batch (batch_alone)
    program="hybrid.py", cells_are="(model, image, defence) cells", explain=lambda *a: config_change(*a))


def config_change(key: str, before: dict, now: dict) -> str | None:
    """Why a resume or a merge is refused, where a file named by its content changed: the
    file, in words (None: sweeps.py says 'key old -> new')."""
    if key == "weights_name":
        if before.get(key) is None and before.get("weights") is not None:
            return (f"its --weights {printable(str(before['weights']), 80)} were recorded by path alone (an older "
                    "version), so they cannot be checked to be these")
        return f"its --weights file was {before.get(key)}, this command's is {now.get(key)} (named by content)"
    if key == "models" and isinstance(before.get(key), list):
        old = {m["file"] + ":" + m["name"]: m["hash"] for m in map(RECORDED_MODULE.fullmatch, before[key]) if m}
        changed = [f"{name} (its content was {old[name]}, it is {m['hash']})"
                   for m in map(RECORDED_MODULE.fullmatch, now[key]) if m
                   and old.get(name := m["file"] + ":" + m["name"], m["hash"]) != m["hash"]]
        if changed:
            return f"the module file {changed[0]} has changed since"
    return None


def run_metadata(exp: Experiment, settings: AttackSettings, run: sweeps.RunSettings, argv: list[str]) -> dict:
    """results.json's header: the config, library versions, device and command line. The
    versions are the installed distributions' (importlib.metadata), read without importing
    them: a torchvision that does not match torch fails on import, and must not stop a run
    that never uses it."""
    import importlib.metadata

    name = torch.cuda.get_device_name() if exp.device == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    versions = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "numpy", "scipy", "scikit-image", "matplotlib"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"config": flat_config(exp, settings, run), "versions": versions, "commit": code_commit(),
            "device": exp.device, "device_name": name, "command": shlex.join(["python", "hybrid.py", *argv])}


def paper_sweep(exp: Experiment, settings: AttackSettings, run: sweeps.RunSettings, argv: list[str],
                images: list[PrivateImage]) -> sweeps.Sweep:
    """The experiment over every model against every image, as sweeps.run takes it."""
    # Image by image, every model on each: a long study stopped part-way (or a shard of it)
    # holds whole images, a smaller study of its own, rather than some of the models.
    defences = [parse_defence(spec) for spec in exp.defences]
    shape = tuple(exp.input_shape)
    takes_of = {name: [a for a in exp.attacks if takes(a, model_blocking(name, shape), exp.batch)]
                for name in exp.models}
    cells = [Cell(name, image, takes_of[name], False, defence)
             for image in images for name in exp.models for defence in defences]
    name = model_stem(exp.models[0]) if len(exp.models) == 1 else "grid"  # a string's commas make no folder name
    return sweeps.Sweep(RECORD, name, run_metadata(exp, settings, run, argv), cells, left_to_do,
                        functools.partial(run_cells, exp, settings), record_event, finish,
                        functools.partial(configure_process, exp.device, run.threads, settings.verbose),
                        functools.partial(units_of, settings))
