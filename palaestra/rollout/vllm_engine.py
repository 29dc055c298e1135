"""A vLLM rollout engine behind the same ``generate(prompts, num_samples, sampling) -> Rollout`` call.

GPU only (``pip install -e ".[gpu]"``). The base model is loaded once into vLLM; the trained LoRA
adapters are *served*, not merged: after each optimizer step the trainer calls
:meth:`VLLMGenerator.sync_adapter`, which saves the adapter (a few MB) to a fresh folder and points
a new ``LoRARequest`` at it, so the next ``generate`` samples from the updated policy. Several
adapters (one per role of a ``per_role`` team) live side by side; ``generate(..., adapter=role)``
picks one. vLLM's prefix caching gives the shared-prompt prefill of a group for free.

The GRPO recipe uses it with ``rollout.engine=vllm`` (checked before any model loads: the
package, a CUDA GPU, LoRA, a model folder) and re-syncs the adapter before every rollout. vLLM reports
the log-prob of every sampled token under the distribution it sampled from (``processed_logprobs``);
they are the rollout's ``sampler_logprobs``, which the mismatch correction weighs the update with
(:mod:`palaestra.algorithms.rollout_correction`), as for rollout workers.

Status: designed against vLLM's offline ``LLM`` API and tested on the CPU only in its pure parts
(the Rollout it builds from token ids) and the configuration checks; it has not been run on a GPU yet.
"""

from __future__ import annotations

from contextlib import nullcontext

import itertools
import shutil
import tempfile
from pathlib import Path


from palaestra.rollout.hf import Rollout, SamplingParams, encode_chat, rollout_from_token_ids, stop_token_ids

__all__ = ["VLLMGenerator"]


class VLLMGenerator:
    """Samples from a vLLM engine with the trainer's LoRA adapters served unmerged.

    Args:
        model: the peft-wrapped policy being trained (its adapters are what ``sync_adapter`` saves).
        tokenizer: its tokenizer (prompts are rendered with the chat template, as in HFGenerator).
        base_path: the base model folder vLLM loads (the same weights the policy started from).
        max_prompt_length: prompts keep their last this many tokens.
        max_lora_rank, max_loras: vLLM's LoRA capacity (ranks up to this; this many adapters at once).
        gpu_memory_utilization: the share of GPU memory vLLM may take (the trainer needs the rest).
    """

    def __init__(self, model, tokenizer, base_path: str, *, max_prompt_length: int = 512, max_lora_rank: int = 64,
                 max_loras: int = 4, gpu_memory_utilization: float = 0.3, seed: int = 0):
        from vllm import LLM

        self.model, self.tokenizer, self.max_prompt_length = model, tokenizer, max_prompt_length
        self.llm = LLM(model=str(base_path), enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras,
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True, seed=seed, dtype="bfloat16",
                       logprobs_mode="processed_logprobs")  # log-probs of what it sampled from: the correction's
        self.stop_ids = stop_token_ids(model, tokenizer)
        self._folder = Path(tempfile.mkdtemp(prefix="palaestra-vllm-adapters-"))
        self._ids = itertools.count(1)
        self._requests: dict[str, object] = {}

    def sync_adapter(self, adapter: str = "default") -> None:
        """Publish the current weights of ``adapter`` to vLLM (call after every optimizer step)."""
        from vllm.lora.request import LoRARequest

        version = next(self._ids)
        folder = self._folder / f"{adapter}-{version}"
        self.model.save_pretrained(str(folder), selected_adapters=[adapter])
        saved = folder / adapter if (folder / adapter).is_dir() else folder  # peft nests non-default adapters
        previous = self._requests.get(adapter)
        self._requests[adapter] = LoRARequest(f"{adapter}-{version}", version, str(saved))
        if previous is not None:  # the old adapter's files are no longer needed
            shutil.rmtree(Path(previous.lora_path), ignore_errors=True)

    def reusing_weights(self):
        """The engine holds its own weights; nothing to reuse between calls (see HFGenerator)."""
        return nullcontext(self)

    def encode_prompts(self, prompts: list[list[dict]]) -> list[list[int]]:
        return [encode_chat(self.tokenizer, messages)[-self.max_prompt_length :] for messages in prompts]

    def generate(self, prompts: list[list[dict]], num_samples: int, sampling: SamplingParams, adapter: str = "default") -> Rollout:
        """``num_samples`` completions per prompt from the latest synced ``adapter``."""
        from vllm import SamplingParams as VllmSampling
        from vllm.inputs import TokensPrompt

        if adapter not in self._requests:
            self.sync_adapter(adapter)
        unique = self.encode_prompts(prompts)
        params = VllmSampling(
            n=num_samples, max_tokens=sampling.max_new_tokens, stop_token_ids=self.stop_ids,
            temperature=0.0 if sampling.greedy else sampling.temperature, top_p=1.0 if sampling.greedy else sampling.top_p,
            top_k=-1 if sampling.greedy or not sampling.top_k else sampling.top_k, logprobs=0,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in unique], params,
                                    lora_request=self._requests[adapter], use_tqdm=False)
        completions, truncated, logprobs = [], [], []
        for request in outputs:
            for sample in request.outputs:
                completions.append(list(sample.token_ids))
                truncated.append(sample.finish_reason == "length")
                logprobs.append([step[token].logprob for token, step in zip(sample.token_ids, sample.logprobs or [])])
        return rollout_from_token_ids(
            unique, completions, num_samples, truncated, pad_id=self.tokenizer.pad_token_id, stop_ids=self.stop_ids,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            logprobs=logprobs if all(len(lp) == len(ids) for lp, ids in zip(logprobs, completions)) else None,
        )
