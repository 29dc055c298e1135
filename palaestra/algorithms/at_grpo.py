"""AT-GRPO math: agent rewards and group filters (agent- and turn-wise grouped GRPO).

A group is the K answers one agent gave from one shared state: key (problem, turn, agent). The
advantages inside a group are GRPO's (``grpo.group_advantages``, any of its estimators); what is
specific to AT-GRPO is how an answer's reward mixes the team's and the agent's own, and which groups
are worth training on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from palaestra.algorithms.grpo import group_advantages
from palaestra.config.choices import GROUP_FILTERS


def tree_advantages(groups: list[Tensor], estimator: str = "grpo", scale: str = "group", eps: float = 1e-4) -> list[Tensor]:
    """The advantages of every group of a step (groups may differ in size; a group of one gets 0).

    ``grpo`` and ``rloo`` work inside each group (:func:`~palaestra.algorithms.grpo.group_advantages`, with
    ``scale``); ``reinforce_pp`` takes each group's mean off, then the mean of all the groups' answers, and
    divides by their std: the batch is every group of the step.

    >>> [a.tolist() for a in tree_advantages([torch.tensor([1., 0.]), torch.tensor([1.])], "rloo", "none")]
    [[1.0, -1.0], [0.0]]
    """
    if estimator != "reinforce_pp":
        return [group_advantages(rewards, len(rewards), scale="none" if len(rewards) < 2 else scale, eps=eps,
                                 estimator=estimator) for rewards in groups]
    if not groups:
        return []
    # A = (r - mean(r_group)), then (A - mean(A_all)) / (std(A_all) + eps)
    centred = torch.cat([rewards.float() - rewards.float().mean() for rewards in groups])
    return list(group_advantages(centred, centred.numel(), eps=eps, estimator="reinforce_pp").split([len(g) for g in groups]))


def agent_reward(local: float, team: float, alpha: float) -> float:
    """reward = alpha * team + local.

    >>> agent_reward(local=0.5, team=1.0, alpha=0.7)
    1.2
    """
    return alpha * team + local


def select_samples(groups: list[Tensor], method: str = "none", ratio: float = 0.0) -> list[Tensor]:
    """Which answers to train on: one bool mask per group (groups may differ in size).

    - ``none``: all.
    - ``mean``: drop the ``ratio`` fraction of groups with the lowest mean reward.
    - ``std``: drop the ``ratio`` fraction of groups with the lowest reward std (least signal).
    - ``dapo``: drop every group whose rewards are all equal (zero advantage, no gradient).
    - ``uid``: in every group drop the ``ratio`` fraction of answers furthest from the group mean.

    Rounding: ``int(ratio * count)`` items are dropped, so a small ratio on few groups drops none.

    >>> [m.tolist() for m in select_samples([torch.tensor([1., 1.]), torch.tensor([0., 1.])], "dapo")]
    [[False, False], [True, True]]
    """
    if method not in GROUP_FILTERS:
        raise ValueError(f"group filter {method!r} is unknown; use one of {', '.join(GROUP_FILTERS)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"filter_ratio={ratio} must be in [0, 1)")
    keep = [torch.ones(len(rewards), dtype=torch.bool) for rewards in groups]
    if method == "none" or not groups:
        return keep
    if method == "dapo":
        return [mask & (rewards.max() > rewards.min()) for mask, rewards in zip(keep, groups)]
    if method == "uid":
        for mask, rewards in zip(keep, groups):
            drop = int(ratio * len(rewards))
            if drop:
                mask[(rewards - rewards.mean()).abs().topk(drop).indices] = False
        return keep
    scores = torch.tensor([float(r.mean()) if method == "mean" else float(r.std(unbiased=False)) for r in groups])
    for index in scores.argsort()[: int(ratio * len(groups))].tolist():
        keep[index][:] = False
    return keep
