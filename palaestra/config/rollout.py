"""The ``rollout`` section: which engine samples a policy-gradient method's completions in training, and how the
update corrects for an engine that is not the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from palaestra.config.errors import check, one_of

__all__ = ["CORRECTIONS", "QUANTIZATIONS", "ROLLOUT_ENGINES", "RolloutSettings", "resolved_correction", "validate_rollout"]

ROLLOUT_ENGINES = ("hf", "vllm", "server")
QUANTIZATIONS = ("none", "int8")
CORRECTIONS = ("auto", "none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass
class RolloutSettings:
    """What samples the completions in training, and the correction of its mismatch with the trainer."""

    engine: str = "hf"
    """hf: palaestra's decode loop on the training model itself (any device); vllm: an in-process vLLM engine
    serving the LoRA adapter (a CUDA GPU and the gpu extra); server: the OpenAI-compatible workers of
    rollout.servers (palaestra serve serve.runtime_lora=true serve.logprobs_mode=processed_logprobs, or vllm serve
    --enable-lora --logprobs-mode processed_logprobs with VLLM_ALLOW_RUNTIME_LORA_UPDATING=true), to which the
    trainer pushes its LoRA adapter after every update."""
    servers: list = field(default_factory=list)
    """With engine=server: the workers' base URLs (http://host:port, with or without /v1); groups are spread
    over them, and a worker that fails has its groups re-sent to the others."""
    quantize: str = "none"
    """With engine=hf on a CPU: none, or int8: the decode steps of few rows (as many as the int8 kernel is faster for
    on this machine, measured once) read int8 copies of the frozen base weights, a quarter of fp32's bytes, with the
    LoRA adapters exact beside them; the rollouts carry the sampler's log-probs and correction=auto corrects them.
    Evaluations sample at full precision. Llama-family models (Llama, Qwen2)."""
    correction: str = "auto"
    """Truncated importance sampling of tokens another engine sampled (Yao et al. 2025; TRL's modes):
    token_truncate (each token's term x min(pi_trainer / pi_sampler, correction_cap)), token_mask (x the ratio, 0
    above the cap), sequence_truncate / sequence_mask (one ratio per completion, the product of its tokens'),
    none, or auto: token_truncate for the vllm and server engines and for quantize=int8, none for hf (the trainer
    samples itself).
    The log-prob gap and the ratios are logged as rollout/* whenever the engine reports log-probs."""
    correction_cap: float = 2.0
    """The largest importance weight kept (truncate) or allowed (mask)."""
    adapter_dir: Optional[str] = None
    """With engine=server: the folder the trainer saves each adapter version to, which every worker must be able
    to read (a shared filesystem for workers on other machines); None: rollout_adapters/ in the run folder."""
    request_timeout_s: float = 600.0
    """With engine=server: the longest one group's request may take before its worker counts as failed."""
    server_wait_s: float = 120.0
    """With engine=server: how long the run waits for a worker to answer when none does (a restart) before it
    stops with an error; it never hangs."""
    api_key: Optional[str] = None
    """With engine=server: the workers' API key (sent as Authorization: Bearer), if they need one."""


def resolved_correction(rollout: RolloutSettings) -> str:
    """The correction mode in force: ``auto`` resolved for the engine.

    >>> resolved_correction(RolloutSettings(engine="server")), resolved_correction(RolloutSettings())
    ('token_truncate', 'none')
    >>> resolved_correction(RolloutSettings(quantize="int8"))
    'token_truncate'
    """
    if rollout.correction != "auto":
        return rollout.correction
    return "none" if rollout.engine == "hf" and rollout.quantize == "none" else "token_truncate"


def validate_rollout(rollout: RolloutSettings) -> None:
    one_of("rollout.engine", rollout.engine, ROLLOUT_ENGINES)
    one_of("rollout.correction", rollout.correction, CORRECTIONS)
    one_of("rollout.quantize", rollout.quantize, QUANTIZATIONS)
    check(rollout.quantize == "none" or rollout.engine == "hf",
          f"rollout.quantize={rollout.quantize} quantizes palaestra's own sampler (rollout.engine=hf); "
          f"rollout.engine={rollout.engine} samples with its own weights")
    check(rollout.correction_cap >= 1, f"rollout.correction_cap={rollout.correction_cap} must be >= 1")
    check(rollout.request_timeout_s > 0, f"rollout.request_timeout_s={rollout.request_timeout_s} must be > 0")
    check(rollout.server_wait_s >= 0, f"rollout.server_wait_s={rollout.server_wait_s} must be >= 0")
    if rollout.engine == "server":
        check(bool(rollout.servers), "rollout.engine=server needs rollout.servers=[http://host:port, ...]: the workers "
                                     "(start one with palaestra serve serve.runtime_lora=true serve.logprobs_mode=processed_logprobs)")
        for url in rollout.servers:
            check(isinstance(url, str) and url.startswith(("http://", "https://")),
                  f"rollout.servers: {url!r} is not an http(s) URL; give http://host:port")
            check(_valid_url(url), f"rollout.servers: {url!r} is not a valid URL; give http://host:port")
    else:
        check(not rollout.servers, f"rollout.servers is set but rollout.engine={rollout.engine}; "
                                   "use rollout.engine=server to sample on them")
    check(rollout.engine != "hf" or rollout.quantize != "none" or resolved_correction(rollout) == "none",
          f"rollout.correction={rollout.correction} needs log-probs from another sampler (rollout.engine=server or "
          "vllm, or rollout.quantize=int8); with hf the trainer samples itself: leave rollout.correction=auto")


def _valid_url(url: str) -> bool:
    import httpx

    try:
        return bool(httpx.URL(url).host)
    except httpx.InvalidURL:
        return False
