"""The sections of the commands that are not a method: ``export``, ``serve`` and ``pipeline``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from palaestra.config.errors import check, check_writable, one_of
from palaestra.config.evaluation import CheckpointEval
from palaestra.config.model import ModelChoice, ServedModel
from palaestra.config.run import DEVICES
from palaestra.config.tracking import TrackingConfig

__all__ = ["ExportConfig", "ExportJob", "PipelineConfig", "PipelineData", "PipelineJob", "ServeConfig", "ServeJob",
           "validate_export", "validate_pipeline_job", "validate_serve"]


@dataclass
class ExportConfig:
    """palaestra export: where and how to write the trained policy."""

    output_dir: str = "exported"
    """Folder to write (replaced atomically if it exists)."""
    merge: bool = True
    """Merge the LoRA adapter into the base (a plain Hugging Face model) or save the adapter alone."""


LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
"""serve.logprobs_mode's values (vLLM's names)."""


@dataclass
class ServeConfig:
    """palaestra serve: an OpenAI-compatible HTTP API over the base model and what was trained from it."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: int = 8000
    """Port to listen on (0: any free port)."""
    base_id: Optional[str] = None
    """Model id of the base model (the model section); None: model.name, or the folder name of model.path."""
    models: list = field(default_factory=list)
    """Trained runs, checkpoints, adapter folders or exported model folders to serve beside the base, each under
    its folder's name (a checkpoint: <run>/<step>). LoRA adapters share the base model in memory."""
    named_models: dict = field(default_factory=dict)
    """The same, under ids of your choice: {id: folder} (on the command line: +serve.named_models.ID=FOLDER)."""
    registry: bool = False
    """Also serve every MLflow registered model version and alias as NAME@VERSION / NAME@ALIAS (tracking.tracking_uri's store)."""
    embedder: Optional[str] = "all-minilm-l6-v2"
    """Model of POST /v1/embeddings: all-minilm-l6-v2 (shipped offline) or a sentence-transformers folder; null: none."""
    index: Optional[str] = None
    """Retrieval index of POST /v1/search: a run folder of palaestra train --target=rag, or its index folder."""
    max_batch_size: int = 32
    """Choices decoded together per model at most; more wait for a place."""
    batch_window_ms: float = 5.0
    """How long an idle server waits for more requests before it starts decoding, so that they start together."""
    max_tokens: int = 256
    """Completion budget of a request that gives no max_tokens (capped by the model's context)."""
    device: str = "auto"
    """Where the models run: auto (a CUDA GPU when torch sees one, else the CPU), cpu or cuda."""
    threads: int = 0
    """CPU threads for torch (0 leaves torch's default)."""
    api_key: Optional[str] = None
    """If set, /v1 requests must carry Authorization: Bearer <api_key>."""
    runtime_lora: bool = False
    """Accept POST /v1/load_lora_adapter {lora_name, lora_path} and POST /v1/unload_lora_adapter {lora_name}
    (vLLM's runtime LoRA endpoints): the adapter is served over the base model under lora_name. What a rollout
    worker for palaestra train rollout.engine=server needs."""
    logprobs_mode: str = "raw_logprobs"
    """Log-probabilities the API returns: raw_logprobs (OpenAI's meaning: the model's own distribution) or
    processed_logprobs (vLLM's: the distribution sampled from, after temperature, top_k and top_p; greedy: raw)."""


@dataclass
class PipelineConfig:
    """palaestra pipeline: stages run in order, each an MLflow child run of one parent run."""

    stages: Optional[list] = None
    """Stages to run (default: all of the pipeline's stages, in order)."""
    skip: list = field(default_factory=list)
    """Stages to leave out."""
    continue_on_failure: bool = False
    """Go on with the next stage after a failed one (default: stop; a re-run resumes at the failed stage)."""
    output_dir: Optional[str] = None
    """Pipeline folder (history.json and one folder per stage); default runs/pipeline-<name>/<timestamp>."""
    resume: Optional[str] = "auto"
    """auto: continue the latest unfinished pipeline folder of this name at its failed stage; null: always start fresh."""


@dataclass
class PipelineData:
    """The data stage of ``palaestra pipeline rlhf|full``."""

    path: str = "datasets/planner/2026-11-22"
    """The data folder the stages read when the pipeline writes none (no data.generator, or the data stage skipped)."""
    generator: Optional[str] = None
    """"package.module:function" taking (folder, date=YYYY-MM-DD) and returning the dated data folder it wrote
    (conf/pipeline.yaml names the planner's); null: the data stage checks that data.path exists."""


def validate_serve(serve: ServeConfig) -> None:
    """The serve section's values (cheap: no model loads)."""
    check(0 <= serve.port <= 65535, f"serve.port={serve.port} must be in [0, 65535]")
    check(serve.max_batch_size >= 1, f"serve.max_batch_size={serve.max_batch_size} must be >= 1")
    check(serve.batch_window_ms >= 0, f"serve.batch_window_ms={serve.batch_window_ms} must be >= 0")
    check(serve.max_tokens >= 1, f"serve.max_tokens={serve.max_tokens} must be >= 1")
    check(serve.threads >= 0, f"serve.threads={serve.threads} must be >= 0")
    one_of("serve.device", serve.device, DEVICES)
    one_of("serve.logprobs_mode", serve.logprobs_mode, LOGPROBS_MODES)
    for path in [*serve.models, *serve.named_models.values()]:
        check(Path(str(path)).is_dir(), f"serve.models: {path} is not a folder; give a run folder, a checkpoint, an adapter "
               "or an exported model folder")
    if serve.index:
        index = Path(serve.index)
        check((index / "index.json").is_file() or (index / "index" / "index.json").is_file(),
               f"serve.index={serve.index} holds no retrieval index; give a run folder of palaestra train --target=rag or its index folder")
    if serve.embedder and serve.embedder != "all-minilm-l6-v2":
        check((Path(serve.embedder) / "config.json").is_file(),
               f"serve.embedder={serve.embedder} is neither all-minilm-l6-v2 nor a sentence-transformers folder")


# ---- the whole config of each command that is not a method ---------------------------------------


@dataclass
class ExportJob:
    """``palaestra export``: a checkpoint's trained weights on their base, written as a Hugging Face folder."""

    model: ModelChoice = field(default_factory=ModelChoice)
    eval: CheckpointEval = field(default_factory=CheckpointEval)
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclass
class ServeJob:
    """``palaestra serve``: an OpenAI-compatible API over a base model and what was trained from it."""

    model: ServedModel = field(default_factory=ServedModel)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class PipelineJob:
    """``palaestra pipeline``: its own settings; each stage composes its method's config."""

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    data: PipelineData = field(default_factory=PipelineData)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def validate_export(job: ExportJob) -> None:
    """palaestra export: a checkpoint to read and a destination it can write."""
    check(bool(job.eval.checkpoint), "palaestra export needs eval.checkpoint=<run folder or step-* folder>")
    check_writable("export.output_dir", job.export.output_dir)


def validate_pipeline_job(job: PipelineJob) -> None:
    if job.pipeline.output_dir:
        check_writable("pipeline.output_dir", job.pipeline.output_dir)
