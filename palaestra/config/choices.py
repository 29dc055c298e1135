"""The allowed values of the keys whose code imports torch: one list each, checked by the schemas without
importing torch and imported by the code that uses them. A leaf module: it imports nothing."""

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
"""algo.loss_type of grpo and at_grpo (algorithms.grpo.policy_loss)."""
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
"""algo.importance_sampling_level of grpo and at_grpo (algorithms.grpo.policy_loss)."""
SCALE_REWARDS = ("group", "batch", "none")
"""algo.scale_rewards of grpo and at_grpo (algorithms.grpo.group_advantages)."""
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")
"""algo.advantage of grpo and at_grpo (algorithms.grpo.group_advantages)."""
GROUP_FILTERS = ("none", "mean", "std", "dapo", "uid")
"""algo.group_filter of at_grpo (algorithms.at_grpo.select_samples)."""
DPO_LOSS_TYPES = ("sigmoid", "ipo")
"""algo.loss_type of dpo (algorithms.preference.dpo_loss)."""
POLICY_MODES = ("shared", "per_role", "separate")
"""policy.mode of at_grpo (models.policies.build_policies)."""
RETRIEVAL_MODES = ("dense", "bm25", "hybrid")
"""algo.mode of rag (retrieval.index.RetrievalIndex)."""
PRECISIONS = ("auto", "bf16", "fp32")
"""model.precision (models.precision)."""
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "auto")
"""model.dtype (models.loading maps them to torch dtypes)."""
