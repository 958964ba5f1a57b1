"""The experiment on a cell (model, image, defence) and on a few cells of one model together; --analyse."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Iterator, NamedTuple, TYPE_CHECKING

import numpy as np
import torch

from leakage import sweeps
from leakage.attacks import ATTACKS
from leakage.console import say, warn
from leakage.data import data_format, to_image, to_images
from leakage.defences import (
    DEFENCES, NO_DEFENCE, defence_seed, defend, fc_inputs_undetermined, parse_defence, private_gradient, surviving
)
from leakage.gradients import inconsistency, shared_gradient
from leakage.labels import label_accuracies, mean_posterior, recover_labels
from leakage.metrics import inf_to_none, matched, score
from leakage.models import Net, architecture, by_layer, draw_uniform, solve_cost
from leakage.modules import build_model, is_code_model, recorded_model
from leakage.paper import rank_deficiency, recover_label, security_index, worst_layer_fraction
from leakage.runtime import seed_everything
from leakage.solvers import StepMemo, memoised
from leakage.training import TRAIN_BATCH, train, training_data

if TYPE_CHECKING:  # annotations alone
    from leakage.data import PrivateImage
    from leakage.defences import Defence
    from leakage.matching import AttackResult
    from leakage.settings import AttackSettings, Experiment

def prepare_model(exp: Experiment, name: str, image: PrivateImage) -> tuple[Net, dict | None]:
    """The model the client holds when it computes its gradient on `image`, and what
    training it had (None: the published initialisation)."""
    classes = exp.classes or data_format(exp)[1]  # an Experiment made in Python leaves them to the data
    model = build_model(name, exp.model_seed, image.shape, classes, exp.weights, exp.weights_name, exp.module_mode)
    if exp.init:
        draw_uniform(model, float(exp.init.partition(":")[2]), exp.model_seed)
    model = model.to(exp.device)
    if exp.train_steps == 0:
        return model, None
    x, y, data = training_data(image, exp.model_seed, exp.data, classes)
    loss = train(model, x, y, exp.train_steps, exp.train_lr, exp.model_seed, image.normalize)
    diverged = not (math.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters()))
    return model, {"steps": exp.train_steps, "lr": exp.train_lr, "batch": TRAIN_BATCH, "seed": exp.model_seed,
                   "data": data, "final_loss": loss if math.isfinite(loss) else None, "diverged": diverged}



# =============================================================================
# The experiment on one cell (model, image, defence), and the analysis of the security index
# =============================================================================


class Training(NamedTuple):
    """How the model of one (model, image) was trained before the client's gradient."""

    info: dict  # steps, lr, batch, seed, data, final_loss, diverged


class Skipped(NamedTuple):
    """Attacks that have nothing to attack on one (model, image), and why."""

    attacks: list[str]
    why: str


class RankAnalysis(NamedTuple):
    """Each convolution's rank deficiency, from R-GAP's recursion, for one (model, image)."""

    deficiency: list[int]


class Defended(NamedTuple):
    """What the client's defence did to its gradient (defend's record); under pruning,
    with the rank deficiencies of the equations that survive."""

    info: dict


class Answer(NamedTuple):
    """One attack's answer to the shared gradient, scored."""

    attack: str
    entry: dict  # for results.json: psnr, ssim, seconds, label, label_correct, the attack's info
    recon: np.ndarray  # the reconstruction, HWC in [0, 1]


def score_answer(name: str, result: AttackResult, seconds: float, image: PrivateImage) -> Answer:
    """The attack's answer scored against `image`; with a captured gradient and no target,
    PSNR and SSIM null (the entry's target is null: nothing to score), and the label's
    correctness null where no label was given. A batch's is scored by batch_answer."""
    if image.size > 1:
        return batch_answer(name, result, seconds, image)
    recon = to_image(result.x, image.normalize)
    scores = {"psnr": None, "ssim": None}
    if image.x is not None:
        metrics = score(to_image(image.x, image.normalize), recon)
        scores = {"psnr": inf_to_none(metrics["psnr"]), "ssim": metrics["ssim"]}
    entry = scores | {"seconds": round(seconds, 3), "label": result.label,
                      "label_correct": None if image.label is None else result.label == image.label, **result.info}
    return Answer(name, entry, recon)


EXACT_DB = 40.0  # a reconstruction this close is the image, to the eye


def batch_answer(name: str, result: AttackResult, seconds: float, image: PrivateImage) -> Answer:
    """A batch's answer: the B reconstructions paired with the B images (metrics.matched) and
    saved in their order; each image's PSNR, SSIM and label in `images`, and their means as the
    entry's psnr and ssim (the mean of the finite PSNRs, null where every image is exact), and
    `exact_images`, the count at EXACT_DB or above. The label's correctness is the fraction of images whose paired
    reconstruction has their label; `label_accuracy` holds iLRG's two measures of the labels as
    a multiset. With no target, the reconstructions keep the attack's order."""
    recons = to_images(result.x, image.normalize)
    labels = list(result.label) if not isinstance(result.label, int) else [result.label] * len(recons)
    entry = {"seconds": round(seconds, 3), **result.info}
    if image.x is None:
        return Answer(name, entry | {"psnr": None, "ssim": None, "label": labels, "label_correct": None}, recons)
    targets = to_images(image.x, image.normalize)
    order = matched(targets, recons)
    recons, labels = recons[order], [labels[j] for j in order]
    each = [score(t, r) for t, r in zip(targets, recons)]
    psnrs = [s["psnr"] for s in each]
    finite = [p for p in psnrs if np.isfinite(p)]
    entry |= {"psnr": float(np.mean(finite)) if finite else None, "ssim": float(np.mean([s["ssim"] for s in each])),
              "label": labels, "label_correct": float(np.mean([a == b for a, b in zip(labels, image.labels)])),
              "label_accuracy": label_accuracies(labels, image.labels), "order": order,
              "exact_images": sum(p >= EXACT_DB for p in psnrs),
              "images": [{"psnr": inf_to_none(s["psnr"]), "ssim": s["ssim"], "label": lab, "label_correct": lab == true}
                         for s, lab, true in zip(each, labels, image.labels)]}
    return Answer(name, entry, recons)


def share_and_attack(cells: list[tuple[Net, PrivateImage]], attacks: list[str], settings: AttackSettings,
                     seed: int, device: str, defence: Defence = NO_DEFENCE,
                     analyse_defence: list[bool] | None = None) -> Iterator[tuple[int, Defended | Answer]]:
    """The paper's experiment on cells (model, image) of one architecture under one defence
    (one cell is a batch of one): each client shares its gradient, defended, and each attack
    answers from what was shared alone, reseeded first (answers). Yields (the cell's index,
    its event): what the defence did (under pruning with the ranks of the surviving
    equations, unless analyse_defence says not for that cell), then each attack's Answer as
    it finishes (R-GAP's carries the rank deficiencies of its recursion)."""
    clients = []
    for i, (model, image) in enumerate(cells):
        if defence.kind == "dp" and image.size > 1:  # DP-SGD clips each image's gradient (Opacus), from the batch
            grads, (shared, info) = None, private_gradient(model, image.x.to(device), image.labels, defence,
                                                           defence_seed(seed, image.name))
        else:
            grads = shared_gradient(model, image, device)
            shared, info = defend(grads, defence, defence_seed(seed, image.name))
        # the analyst's: the client's own gradient, the surviving rows
        if defence.removes_equations and has_ranks(model, image) and (analyse_defence is None or analyse_defence[i]):
            known = surviving(shared)
            info |= {"rank_deficiency": rank_deficiency(model, grads, known),
                     "fc_inputs_undetermined": fc_inputs_undetermined(model, known)}
        yield i, Defended(info)
        del grads  # from here on, the attacks' side: what was shared alone
        label = image.label if settings.true_label else recovered(model, shared, image)  # under noise, maybe wrong
        clients.append((model, shared, label))
    settings = dataclasses.replace(settings, zeros_are_missing=defence.removes_equations)  # an attacker sees the zeros
    for i, name, result, seconds in answers(clients, attacks, settings, seed):
        image = cells[i][1]
        if image.captured is not None and defence == NO_DEFENCE and (why := inconsistency(result.info.get("residual"))):
            warn(f"{image.name}: {why}")  # a captured gradient said to be this model's (an own one holds)
        yield i, score_answer(name, result, seconds, image)


def has_ranks(model: Net, image: PrivateImage) -> bool:
    """Whether R-GAP's recursion gives ranks for this client: one image's gradient, on a chain."""
    return isinstance(model, Net) and image.size == 1


def recovered(model: Net, shared: list[torch.Tensor], image: PrivateImage) -> int | tuple[int, ...]:
    """The label the attacker reads from the shared gradient: iDLG's for one image, a batch's
    counts for B (labels.recover_labels)."""
    if image.size == 1:
        return recover_label(shared, model.bias_at)
    return recover_labels(shared[model.bias_at], image.size, mean_posterior(model, image.shape, image.normalize))


Client = tuple  # (model, shared gradient, label): one cell's side of the attacks


def answers(clients: list[Client], attacks: list[str], settings: AttackSettings,
            seed: int) -> Iterator[tuple[int, str, AttackResult, float]]:
    """Each attack's answer to each client's shared gradient (models of one architecture;
    one client is a batch of one), reseeded first, attack by attack: (the client's index,
    the attack, its result, its seconds). An attack with a `together` form answers all of
    them at once (their seconds shared out evenly, recorded as `batch_size`); the others one
    client at a time. Each client keeps its own StepMemo: the recursion's steps are shared
    among its attacks, and an attack that ran no step of its own and answers as an earlier
    one did, bit for bit, is marked `derived_from` it."""
    memos, done = [StepMemo() for _ in clients], [{} for _ in clients]

    def marked(i: int, name: str, result: AttackResult, before: tuple[int, int]) -> AttackResult:
        if memos[i].computed == before[0] and memos[i].taken > before[1]:  # every step it took was another's
            same = next((other for other, x in done[i].items() if torch.equal(x, result.x)), None)
            if same is not None:
                result.info["derived_from"] = same
        done[i][name] = result.x
        return result
    for name in attacks:
        attack = ATTACKS[name]
        if attack.together is not None and len(clients) > 1:
            seed_everything(seed)  # as before each client's run alone: so any subset and order gives these numbers
            before, start = [(s.computed, s.taken) for s in memos], time.perf_counter()
            results = attack.together(*map(list, zip(*clients)), settings, memos)
            seconds = (time.perf_counter() - start) / len(clients)
            for i, result in enumerate(results):
                result.info["batch_size"] = len(clients)
                yield i, name, marked(i, name, result, before[i]), seconds
            continue
        for i, (model, shared, label) in enumerate(clients):
            with memoised(memos[i]):
                seed_everything(seed)  # so any subset of the attacks, in any order, gives the same numbers
                before, start = (memos[i].computed, memos[i].taken), time.perf_counter()
                result = attack.run(model, shared, label, settings)
                seconds = time.perf_counter() - start
            yield i, name, marked(i, name, result, before), seconds


def rank_analysis(model: Net, image: PrivateImage, device: str) -> RankAnalysis:
    """Each convolution's rank deficiency for the client's gradient on `image`: R-GAP's
    recursion alone, no attack."""
    return RankAnalysis(rank_deficiency(model, shared_gradient(model, image, device)))


_UNDEFENDED_RANKS: dict[tuple, list[int]] = {}  # undefended_ranks' cache: the last (model, image)'s, in this process


def undefended_ranks(key: tuple, model: Net, image: PrivateImage, device: str) -> RankAnalysis:
    """rank_analysis once per (model, image) of a sweep, `key` naming the model the client
    holds and its image: every defence of a grid shares the client's gradient, and so its
    ranks, and a worker is handed a (model, image)'s defences one after another."""
    if key not in _UNDEFENDED_RANKS:
        _UNDEFENDED_RANKS.clear()
        _UNDEFENDED_RANKS[key] = rank_analysis(model, image, device).deficiency
    return RankAnalysis(list(_UNDEFENDED_RANKS[key]))


def nothing_to_attack(model: Net, image: PrivateImage, device: str) -> str | None:
    """Why the client's gradient on `image` cannot be attacked, or None. A gradient that is
    not finite (a model whose training diverged shares NaNs) makes every linear system and
    every objective NaN; one that is exactly zero (a saturated output layer) carries nothing:
    no label to read, every system 0 = 0, every objective flat."""
    grads = shared_gradient(model, image, device)
    if not all(torch.isfinite(g).all() for g in grads):
        weights = all(torch.isfinite(p).all() for p in model.parameters())
        return "the client's gradient is not finite" + (
            "" if weights else " (the model's weights are not: its training diverged)")
    if not any(g.any() for g in grads):
        return "the client's gradient is exactly zero, so it carries nothing to attack (a saturated output layer?)"
    return None


def analyse_images(exp: Experiment, images: list[PrivateImage]) -> int:
    """Rank deficiency per layer and the security index, without running an attack.

    One table per (model, image), and one per pruning defence of --defence (the equations
    that survive it); over several images, the security index per model (mean and range):
    the paper's architecture comparison. A cell that cannot be analysed (a gradient that is
    not finite, memory that runs out) is one line on stderr, and the exit status is 1; the
    others are analysed.
    """
    table, failed = [], 0
    defences = [parse_defence(spec) for spec in exp.defences]
    prunings = [d for d in defences if d.removes_equations]
    keeping = [DEFENCES[k].usage(k) for k in dict.fromkeys(d.kind for d in defences if d not in prunings)
               if k != "none"]
    if keeping:
        say(f"{' and '.join(keeping)} leave every equation in place: the ranks under them are the undefended ones")
    for name in exp.models:
        indices = []
        for image in images:
            model, _ = prepare_model(exp, name, image)
            why = nothing_to_attack(model, image, exp.device)
            if why is None:
                try:
                    grads = shared_gradient(model, image, exp.device)
                    deficiency = rank_deficiency(model, grads)
                    known = [surviving(defend(grads, d, 0)[0]) for d in prunings]
                    pruned = [rank_deficiency(model, grads, k) for k in known]
                except Exception as e:  # as a sweep's cell: this one is lost, the rest go on
                    why = sweeps.reason(e)
            if why is not None:
                print(f"hybrid.py: {name} on {image.name}: {why}", file=sys.stderr)
                failed += 1
                continue
            indices.append(security_index(deficiency))
            unknowns = [math.prod(shape) for shape in model.shapes[:-1]]
            say_ranks(model, f"{name} on {image.name}", deficiency, unknowns)
            for d, under, k in zip(prunings, pruned, known):
                say_ranks(model, f"{name} on {image.name} under {d.spec}", under, unknowns, k)
                say(f"  and {fc_inputs_undetermined(model, k):.1%} of the fc's inputs left undetermined")
        if indices:
            table.append((name, np.mean(indices), min(indices), max(indices)))
    if len(images) > 1 and table:
        say(f"\nsecurity index over {len(images)} images")
        say("| model | mean | min | max |\n|---|---|---|---|")
        for name, mean, lo, hi in table:
            say(f"| {name} | {mean:.1f} | {lo} | {hi} |")
    return 1 if failed else 0


def say_ranks(model: Net, title: str, deficiency: list[int], unknowns: list[int],
              known: list[torch.Tensor] | None = None) -> None:
    """One (model, image)'s table of ranks and both indices; under pruning, of the
    equations that survive it (`known`, per parameter)."""
    say(f"{title}: security index {security_index(deficiency)}, "
        f"worst layer's fraction {worst_layer_fraction(deficiency, unknowns):.4f}")
    say(f"  {'layer':>5} {'input':>9} {'unknowns':>9} {'equations':>10} {'rank':>6} {'deficiency':>11}")
    for layer, r in enumerate(deficiency):
        shape, n = model.shapes[layer], math.prod(model.shapes[layer])
        weights = model.layers[layer].weight.numel() if known is None else int(by_layer(model, known)[layer][0].sum())
        equations = math.prod(model.shapes[layer + 1]) + weights
        say(f"  {layer:5d} {'x'.join(map(str, shape)):>9} {n:9d} {equations:10d} {n + r:6d} {r:11d}")


class Cell(NamedTuple):
    """One (model, image, defence) of a sweep, with what is left to do on it."""

    model: str
    image: PrivateImage
    attacks: list[str]  # the attacks not yet recorded
    ranks_recorded: bool  # its entry holds the rank deficiencies already (and, under pruning, those under it)
    defence: Defence = NO_DEFENCE

    @property
    def key(self) -> tuple[str, ...]:
        return cell_key(recorded_model(self.model), self.image.name, self.defence.spec)

    @property
    def parts(self) -> list[str]:  # what sweeps.py calls a unit's parts
        return self.attacks


def cell_key(model: str, image: str, defence: str) -> tuple[str, ...]:
    """A cell's name in the record and its grid.json: (model, image) undefended, (model,
    image, defence) under a defence."""
    return (model, image) + (() if defence == "none" else (defence,))


def entry_key(entry: dict) -> tuple[str, ...]:
    return cell_key(entry["model"], entry["image"], entry["defence"]["spec"])  # upgraded: every entry has one


def left_to_do(cell: Cell, entry: dict | None) -> Cell | None:
    """The cell less what its entry of the record holds (attacks done, or skipped: a
    gradient with nothing to attack stays so); None when nothing is left."""
    entry = entry or {}
    done = entry.get("attacks", {}).keys() | entry.get("skipped", {}).keys()
    todo = [a for a in cell.attacks if a not in done]
    known = "rank_deficiency" in entry and (not cell.defence.removes_equations
                                            or "rank_deficiency" in entry.get("defence", {}))
    return cell._replace(attacks=todo, ranks_recorded=known) if todo else None


def run_cells(exp: Experiment, settings: AttackSettings, cells: tuple[Cell, ...]) -> Iterator[tuple[Cell, object]]:
    """Cells of one model and defence (units_of), each as the client holds its model
    (trained first with --train-steps), with its rank deficiencies where the record lacks
    them and R-GAP will not give them; then the experiment on them together: (cell, event)."""
    ready = []
    for cell in cells:
        model, training = prepare_model(exp, cell.model, cell.image)
        if training is not None:
            yield cell, Training(training)
        why = nothing_to_attack(model, cell.image, exp.device)
        if why is not None:
            yield cell, Skipped(cell.attacks, why)
            continue
        if not cell.ranks_recorded and has_ranks(model, cell.image) and ("rgap" not in cell.attacks
                                                                          or cell.defence != NO_DEFENCE):
            held = (cell.model, cell.image.name, exp.model_seed, exp.train_steps, exp.train_lr, exp.data, exp.device)
            yield cell, undefended_ranks(held, model, cell.image, exp.device)  # R-GAP's, under a defence, are not
        ready.append((cell, model))  # the client's
    if not ready:
        return
    analyse = [not cell.ranks_recorded for cell, _ in ready]
    for i, event in share_and_attack([(model, cell.image) for cell, model in ready], ready[0][0].attacks,
                                              settings, exp.seed, exp.device, ready[0][0].defence,
                                              analyse_defence=analyse):
        yield ready[i][0], event


def units_of(settings: AttackSettings, cells: list[Cell]) -> list[tuple[Cell, ...]]:
    """The cells left, in units worked on together: up to --batch-images cells of one model,
    defence and attacks left, where an attack among them answers several at once (the
    hybrid and hybrid_free, without --compile). The first unit of each such group, then the second, and
    so on (a study stopped part-way holds whole sets of images); within each, the costliest
    models' first, so that the workers finish together. Single cells keep their order."""
    batched = settings.batch_images > 1 and not settings.compile
    units: dict[tuple, list[list[Cell]]] = {}
    for n, cell in enumerate(cells):
        together = batched and any(ATTACKS[a].together for a in cell.attacks)
        key = (cell.model, cell.defence.spec, tuple(cell.attacks)) if together else n
        groups = units.setdefault(key, [[]])
        if len(groups[-1]) == settings.batch_images:
            groups.append([])
        groups[-1].append(cell)
    order = {cell.key: n for n, cell in enumerate(cells)}
    ranked = [(k, -model_cost(g[0]) if isinstance(key, tuple) else 0, order[g[0].key], g)
              for key, groups in units.items() for k, g in enumerate(groups)]
    return [tuple(g) for *_, g in sorted(ranked, key=lambda r: r[:3])]


def model_cost(cell: Cell) -> float:
    """The solves' flops of the cell's model, up to a constant (solve_cost); 0 for a module's."""
    return 0.0 if is_code_model(cell.model) else solve_cost(architecture(cell.model, cell.image.shape))[0]
