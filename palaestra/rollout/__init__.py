"""Generation engines behind one interface: ``generate(prompts, num_samples, sampling) -> Rollout``."""

from palaestra.rollout.hf import HFGenerator, Rollout, SamplingParams, completion_mask_from_ids

__all__ = ["HFGenerator", "Rollout", "SamplingParams", "completion_mask_from_ids"]
