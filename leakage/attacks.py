"""ATTACKS: one row per attack, the paper's, ours and the baselines'."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TYPE_CHECKING

from leakage.baselines import attack_cosine, attack_dlg, attack_idlg
from leakage.paper import attack_hybrid, attack_hybrid_free, attack_rgap

if TYPE_CHECKING:  # annotations alone
    import torch

    from leakage.matching import AttackFunction, AttackResult
    from leakage.models import Net
    from leakage.settings import AttackSettings

# -- ATTACKS: one row per attack --------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """One row of ATTACKS: all that the program knows of an attack. Its order in ATTACKS
    is the figures' and tables' column order."""

    run: AttackFunction
    shown: str  # its name in figures, tables and printed lines
    marker: str  # its matplotlib marker in the figures
    paper: bool  # one of the paper's comparison: the default --attacks
    settings: tuple[str, ...] = ()  # the AttackSettings it reads beyond the label: a flag for one needs the attack
    together: Callable[..., list[AttackResult]] | None = None  # several clients' at once (experiment.answers)
    linear: bool = False  # solves each layer's linear system: needs the chain (a Net), not any classifier


def one_client(together: Callable[..., list[AttackResult]]) -> AttackFunction:
    """An attack's own signature, from its form on several clients: one client is a batch
    of one, in the StepMemo of the cell that runs it."""
    def run(model: Net, grads: list[torch.Tensor], label: int, settings: AttackSettings) -> AttackResult:
        return together([model], [grads], [label], settings, [None])[0]
    return run


ATTACKS: dict[str, Attack] = {
    "rgap": Attack(attack_rgap, "R-GAP", "o", paper=True, linear=True),
    "dlg": Attack(attack_dlg, "DLG", "v", paper=True, settings=("dlg_iters", "restarts")),
    "idlg": Attack(attack_idlg, "iDLG", "^", paper=True, settings=("dlg_iters", "restarts")),
    "cosine": Attack(attack_cosine, "Cosine+TV", "D", paper=True, settings=("cosine_iters", "restarts")),
    "hybrid": Attack(one_client(attack_hybrid), "Hybrid", "s", paper=True,
                     settings=("hybrid_iters", "hybrid_iters_first", "compile", "batch_images"), together=attack_hybrid,
                     linear=True),
    "hybrid_free": Attack(one_client(attack_hybrid_free), "Hybrid, free layers", "P", paper=False,
                          settings=("hybrid_iters", "hybrid_iters_first", "compile", "batch_images", "correct_where"),
                          together=attack_hybrid_free, linear=True),
}


def takes(name: str, blocking: tuple, batch: int = 1) -> bool:
    """Whether attack `name` can take a model with these blocking layers (modules.model_blocking)
    on batches of `batch` images: the optimisation attacks take any classifier and batch, the
    linear ones a chain and one image."""
    return not (ATTACKS[name].linear and (blocking or batch > 1))


def paper_attacks() -> list[str]:
    """The default --attacks: the paper's comparison, in ATTACKS' order."""
    return [name for name, attack in ATTACKS.items() if attack.paper]
