"""Pure math of the training methods: shapes in docstrings, hand-checked tests in tests/unit."""

from palaestra.algorithms.at_grpo import GROUP_FILTERS, agent_reward, select_samples
from palaestra.algorithms.grpo import LOSS_TYPES, SCALE_REWARDS, accumulated_loss, group_advantages, k3_kl, policy_loss
from palaestra.algorithms.logprob_math import entropy_from_logits, masked_mean, selective_log_softmax
from palaestra.algorithms.ppo import gae, kl_penalty_rewards, ppo_policy_loss, value_loss, whiten
from palaestra.algorithms.preference import bradley_terry_loss, dpo_loss, sequence_logprob

__all__ = [
    "GROUP_FILTERS",
    "LOSS_TYPES",
    "SCALE_REWARDS",
    "accumulated_loss",
    "agent_reward",
    "bradley_terry_loss",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "k3_kl",
    "kl_penalty_rewards",
    "masked_mean",
    "policy_loss",
    "ppo_policy_loss",
    "select_samples",
    "selective_log_softmax",
    "sequence_logprob",
    "value_loss",
    "whiten",
]
