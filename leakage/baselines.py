"""The baselines: DLG and iDLG (L-BFGS on the squared gradient distance) and Cosine+TV."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from leakage.console import progress
from leakage.matching import (
    AttackResult, best_start, cosine_distance, dummy_gradient, objective_info, squared_distance, total_variation
)

if TYPE_CHECKING:  # annotations alone
    from leakage.models import Net
    from leakage.settings import AttackSettings

# =============================================================================
# Baselines: DLG, iDLG (L-BFGS on ||dg||^2) and Cosine+TV
# =============================================================================


def labels_of(label: int | tuple[int, ...]) -> list[int]:
    """One image's label or a batch's labels, as a list: the batch's size is its length."""
    return [label] if isinstance(label, int) else list(label)


def lbfgs_attack(model: Net, grads: list[torch.Tensor], label: int | tuple[int, ...], steps: int,
                 name: str, soft_label: bool = False) -> AttackResult:
    """Dummy images, one per label (and, with soft_label, dummy label logits for each) ~ N(0, 1),
    L-BFGS lr 1."""
    device, batch = grads[0].device, len(labels_of(label))
    x = torch.randn(batch, *model.shapes[0], device=device, requires_grad=True)
    y = torch.randn(batch, model.classes, device=device, requires_grad=True) if soft_label else None
    variables = [x] if y is None else [x, y]
    opt = torch.optim.LBFGS(variables, lr=1)

    def closure() -> torch.Tensor:
        target = torch.tensor(labels_of(label), device=device) if y is None else y.softmax(-1)
        loss = squared_distance(dummy_gradient(model, model(x), target), grads)
        for v, g in zip(variables, torch.autograd.grad(loss, variables)):
            v.grad = g
        return loss

    last, losses = [v.detach().clone() for v in variables], []
    bar = progress(steps, name)
    for _ in bar:
        losses.append(opt.step(closure).item())  # the objective before this step
        if not all(torch.isfinite(v).all() for v in variables):  # diverged: keep the last finite
            break
        last = [v.detach().clone() for v in variables]
        bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
    found = label if y is None else int(last[1].argmax()) if batch == 1 else tuple(last[1].argmax(-1).tolist())
    with torch.no_grad():
        target = torch.tensor(labels_of(found), device=device) if y is None else last[1].softmax(-1)
    final = squared_distance(dummy_gradient(model, model(last[0].requires_grad_()), target), grads).item()
    return AttackResult(last[0].detach(), found, objective_info(losses[:1], final))


def attack_dlg(model: Net, grads: list[torch.Tensor], label: int, settings: AttackSettings) -> AttackResult:
    """DLG (Zhu et al., NeurIPS 2019): image and soft label jointly, 300 steps in the paper;
    with --true-label the label is given instead."""
    soft = not settings.true_label  # its own labels: the batch's size from those handed to it
    return best_start(lambda: lbfgs_attack(model, grads, label, settings.dlg_iters, "dlg", soft), settings.restarts)


def attack_idlg(model: Net, grads: list[torch.Tensor], label: int, settings: AttackSettings) -> AttackResult:
    """iDLG (Zhao et al., 2020): the label from the last bias gradient (recover_label,
    unless --true-label), then DLG on the image alone."""
    return best_start(lambda: lbfgs_attack(model, grads, label, settings.dlg_iters, "idlg"), settings.restarts)


def attack_cosine(model: Net, grads: list[torch.Tensor], label: int, settings: AttackSettings) -> AttackResult:
    """Cosine+TV (Geiping et al., NeurIPS 2020) as the published code configured it:
    image ~ N(0, 1), Adam lr 1e-3, 4800 steps in the paper."""
    return best_start(lambda: cosine_start(model, grads, label, settings.cosine_iters), settings.restarts)


def cosine_start(model: Net, grads: list[torch.Tensor], label: int | tuple[int, ...], steps: int) -> AttackResult:
    device = grads[0].device
    x = torch.randn(len(labels_of(label)), *model.shapes[0], device=device, requires_grad=True)
    target = torch.tensor(labels_of(label), device=device)
    tv_weight = 0.01 * len(grads)  # the published code added 0.01 TV once per tensor
    opt = torch.optim.Adam([x], lr=1e-3)
    objective = lambda: cosine_distance(dummy_gradient(model, model(x), target), grads) + tv_weight * total_variation(x)  # noqa: E731
    first = objective().item()
    bar = progress(steps, "cosine")
    for step in bar:
        loss = objective()
        (x.grad,) = torch.autograd.grad(loss, [x])
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
    return AttackResult(x.detach(), label, objective_info([first], objective().item()))
