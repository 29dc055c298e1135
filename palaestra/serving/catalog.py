"""What the server serves: model ids -> a network in memory and the LoRA adapter to run it with.

Sources, each served under its own model id:

* the **base model** (the config's ``model`` section) under ``serve.base_id`` (default: its name);
* **trained runs and folders** (``serve.models``, ``serve.named_models``): a run folder or checkpoint whose policy is a
  LoRA adapter, or a peft adapter folder (``palaestra export export.merge=false``), is loaded as
  one more adapter on the base model (peft ``load_adapter``: several adapters share one base in
  memory and each request picks its own); a full fine-tune's checkpoint, or a merged exported
  folder, is a network of its own;
* **MLflow registered models** (``serve.registry``): ``NAME@VERSION`` and ``NAME@ALIAS`` for every
  version and alias in the store (``planner_model@3``, ``planner_model@active``); listed afresh on
  every ``GET /v1/models``, downloaded and loaded on the first request that names one; an alias is
  resolved per request, so promoting a version moves the alias's traffic without a restart.
* **adapters loaded at runtime** (``serve.runtime_lora``, vLLM's ``/v1/load_lora_adapter``):
  :meth:`Catalog.add_adapter` loads a peft adapter folder over the base model under a name of the
  client's choice and :meth:`Catalog.remove_adapter` deletes it again (a trainer pushes a new
  adapter every step and unloads the old one). Both change the network's modules, so they run on
  the engine's decode thread (:meth:`~palaestra.serving.engine.Engine.call`), between steps.

:func:`plan_models` checks the folders (cheap, one-line ``ConfigError``) before anything loads.
"""

from __future__ import annotations

import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from palaestra.config.errors import ConfigError

__all__ = ["AdapterRefused", "Catalog", "LoadedModel", "ModelNotFound", "Route", "plan_models"]


class ModelNotFound(LookupError):
    """A request named a model id this server does not serve."""


class AdapterRefused(ValueError):
    """A runtime adapter cannot be loaded or unloaded; the message is one line, ``param`` the request
    field it is about (lora_name or lora_path)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Source:
    """A folder to serve: ``kind`` is adapter (LoRA over the base), full (a full fine-tune's
    checkpoint over the base architecture) or hf (a Hugging Face model folder)."""

    kind: str
    folder: Path


def plan_models(models: list, base_id: str, named_models: dict | None = None) -> dict[str, Source]:
    """``serve.models`` (folders, each served under its name: ``<run>/<step>`` for a checkpoint folder)
    and ``serve.named_models`` ({id: folder}) as model id -> :class:`Source`."""
    from palaestra import checkpoint as ckpt

    named = {}
    for path in models or []:
        folder = Path(str(path)).expanduser()
        resolved = folder.resolve()
        name = resolved.name
        if resolved.parent.name == "checkpoints":  # a step-* or best folder: say which run
            name = f"{resolved.parent.parent.name}/{name}"
        if name in named or name == base_id:
            raise ConfigError(f"serve.models: two models would be served as {name!r}; name them: serve.named_models={{a: PATH, b: PATH}}")
        named[name] = str(path)
    for key, value in (named_models or {}).items():
        if str(key) in named:
            raise ConfigError(f"serve.named_models.{key} is also the name of a folder in serve.models; choose another id")
        named[str(key)] = str(value)
    plan = {}
    for model_id, path in named.items():
        if model_id == base_id:
            raise ConfigError(f"serve.named_models.{model_id} has the base model's id; choose another id")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"serve.models: {path} is not a folder; give a run folder, a checkpoint, an adapter or an exported model folder")
        if (folder / "adapter_config.json").is_file():
            plan[model_id] = Source("adapter", folder)
        elif (folder / "config.json").is_file():
            plan[model_id] = Source("hf", folder)
        else:
            try:
                checkpoint = ckpt.resolve_resume(str(folder), folder)
            except FileNotFoundError:
                checkpoint = None
            if checkpoint is None:
                raise ConfigError(f"serve.models: {path} holds no checkpoint, adapter or model; give a run folder, a checkpoint, "
                                  "an adapter or an exported model folder")
            if (checkpoint / "adapter").is_dir():
                plan[model_id] = Source("adapter", checkpoint / "adapter")
            elif (checkpoint / "trainable.safetensors").is_file():
                plan[model_id] = Source("full", checkpoint)
            else:
                raise ConfigError(f"serve.models: {checkpoint} has one policy per role (a team run); serve an exported folder instead")
    return plan


class LoadedModel:
    """One network in memory, the LoRA adapters loaded over it, and its tokenizer.

    The first adapter wraps the network in a peft model (in place: its linear layers get LoRA
    layers); it stays wrapped when the last adapter is removed. Adapter names are ``adapter_<k>``
    with ``k`` counting up, never reused, so a removed adapter's name cannot come back.
    """

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer  # decoding runs in the weights' own dtype
        self.hf_model = model  # the Hugging Face model; a peft wrapper adds LoRA layers inside it
        self.device = next(model.parameters()).device
        eos = getattr(model.generation_config, "eos_token_id", None)
        self.stop_ids = {tokenizer.eos_token_id} | set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 4096))
        self.adapters: list[str] = []
        self._named = 0  # adapters named so far
        from palaestra.rollout.fast_llama import PackedWeightsCache

        self.packed = PackedWeightsCache()  # the lean step's packed weights, one copy per adapter

    def add_adapter(self, folder: Path) -> str:
        """Load the peft adapter in ``folder`` over this network; return its adapter name.

        An adapter made for another network (other layer shapes, or layers this one lacks) raises
        ValueError whose first line says so, and leaves nothing of it behind.
        """
        from peft import PeftConfig, PeftModel, get_peft_model

        name = f"adapter_{self._named}"  # peft names become module keys: no dots, no slashes
        self._named += 1
        try:
            with warnings.catch_warnings():  # peft still asks transformers the deprecated v5 spelling
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                if not isinstance(self.model, PeftModel):  # what PeftModel.from_pretrained does, in two steps
                    config = PeftConfig.from_pretrained(str(folder))
                    self.model = get_peft_model(self.model, config, adapter_name=name)
                result = self.model.load_adapter(str(folder), adapter_name=name)
            # peft loads with strict=False: weights for modules the network lacks, or modules left without theirs
            misfits = [k for k in result.unexpected_keys if "lora_" in k] + [k for k in result.missing_keys if f".{name}." in k]
            if misfits:
                raise ValueError(f"the adapter does not fit this model (no match for {misfits[0]})")
        except Exception:
            if isinstance(self.model, PeftModel) and name in self.model.peft_config:
                self.model.delete_adapter(name)
            raise
        self.model.eval().requires_grad_(False)
        self.adapters.append(name)
        return name

    def remove_adapter(self, name: str) -> None:
        """Delete adapter ``name`` (its LoRA weights) and the packed weights built with it."""
        with warnings.catch_warnings():  # peft makes another adapter active in its place: activate() sets one anyway
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*", category=UserWarning)
            self.model.delete_adapter(name)
        self.adapters.remove(name)
        for key in [key for key in self.packed.entries if key[0] and name in key[0][0]]:  # key: ((active, off, merged), dtype)
            del self.packed.entries[key]

    @property
    def plain(self):
        """The Hugging Face model under the peft wrapper (its LoRA layers inside)."""
        return self.hf_model

    def activate(self, adapter: str | None):
        """Context in which forwards run with ``adapter`` (None: the base, adapters off)."""
        if not self.adapters:
            return nullcontext()  # no adapter, or LoRA layers without any: the base itself
        if adapter is None:
            self.model.set_adapter(self.adapters[0])  # disable_adapter reads the active adapter's config
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return nullcontext()


@dataclass(frozen=True)
class Route:
    """What a model id names: a loaded network and the adapter to run (None: the network itself).
    ``key`` is the canonical id (an alias and its version share one, and so one batch)."""

    key: str
    loaded: LoadedModel
    adapter: str | None = None

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def stop_ids(self) -> set[int]:
        return self.loaded.stop_ids

    @property
    def device(self):
        return self.loaded.device

    @property
    def max_positions(self) -> int:
        return self.loaded.max_positions

    def activate(self):
        return self.loaded.activate(self.adapter)

    def batch(self):
        """A new running batch for this route: the lean step where the model has it (packed weights,
        this route's adapter merged in), else the Hugging Face forward. ModelNotFound once the
        adapter was unloaded."""
        from palaestra.rollout.fast_llama import supports_fast_decode
        from palaestra.serving.batch import HFBatch, LeanBatch

        if self.adapter is not None and self.adapter not in self.loaded.adapters:
            raise ModelNotFound(self.key)
        with self.activate():
            if supports_fast_decode(self.loaded.plain):
                return LeanBatch(self.loaded.plain, weights=self.loaded.packed.get(self.loaded.plain))
            return HFBatch(self.loaded.plain)


class Catalog:
    """Model ids -> routes; registered models are found, downloaded and loaded on demand."""

    def __init__(self, routes: dict[str, Route], load_folder, tracking_uri: str | None = None, registry: bool = False,
                 base_id: str | None = None):
        self.routes = routes
        self.base_id = base_id  # the base model's id: runtime adapters load over its network
        self.created = int(time.time())
        self._load_folder = load_folder  # folder -> LoadedModel (a registered version's download)
        self._tracking_uri, self._registry = tracking_uri, registry
        self._lock = threading.Lock()

    @classmethod
    def load(cls, *, model_name: str, model_path: str | None, base_id: str, plan: dict[str, Source], device: str,
             dtype: str, registry: bool = False, tracking_uri: str | None = None) -> "Catalog":
        """Load the base model, then every planned source (adapters over the base, others beside it)."""
        from palaestra.checkpoint import load_trained_weights
        from palaestra.models import load_model_and_tokenizer

        def load(name, path=None):
            model, tokenizer = load_model_and_tokenizer(name, path=path, dtype=dtype, device=device)
            return LoadedModel(model.requires_grad_(False), tokenizer)

        base = load(model_name, model_path)
        routes = {base_id: Route(base_id, base)}
        for model_id, source in plan.items():
            if source.kind == "adapter":
                routes[model_id] = Route(model_id, base, base.add_adapter(source.folder))
            elif source.kind == "hf":
                routes[model_id] = Route(model_id, load("hf", str(source.folder)))
            else:
                loaded = load(model_name, model_path)
                load_trained_weights(loaded.model, source.folder)
                loaded.model.requires_grad_(False)
                routes[model_id] = Route(model_id, loaded)
        return cls(routes, lambda folder: load("hf", str(folder)), tracking_uri, registry, base_id)

    def ids(self) -> list[str]:
        """Every model id served now: the loaded ones, then the registry's versions and aliases."""
        ids = list(self.routes)
        if self._registry:
            from palaestra.registry import list_models

            for info in list_models(self._tracking_uri):
                ids += [f"{info.name}@{info.version}"] + [f"{info.name}@{alias}" for alias in info.aliases]
        return list(dict.fromkeys(ids))

    def route(self, model_id: str) -> Route:
        """The route of ``model_id`` (a registered version is loaded on first use: call from a worker thread)."""
        route = self.routes.get(model_id)
        if route is not None:
            return route
        if not (self._registry and "@" in model_id):
            raise ModelNotFound(model_id)
        from palaestra.registry import download_model, open_client, resolve_version

        name, _, version = model_id.rpartition("@")
        try:
            canonical = f"{name}@{resolve_version(open_client(self._tracking_uri), name, version).version}"
        except (ConfigError, FileNotFoundError):
            raise ModelNotFound(model_id) from None
        with self._lock:
            if canonical not in self.routes:
                folder = download_model(name, canonical.rpartition("@")[2], tracking_uri=self._tracking_uri)
                self.routes[canonical] = Route(canonical, self._load_folder(folder))
        return self.routes[canonical]

    def add_adapter(self, model_id: str, folder: Path) -> Route:
        """Serve the peft adapter in ``folder`` over the base model as ``model_id`` (on the decode
        thread); AdapterRefused (one line) for a taken id, a folder without an adapter, or an
        adapter that does not fit the base."""
        if model_id in self.routes:
            raise AdapterRefused(f"The LoRA adapter {model_id!r} has already been loaded; unload it first or choose another "
                                 "lora_name", "lora_name")
        if self._registry and "@" in model_id:
            raise AdapterRefused(f"lora_name {model_id!r} has the NAME@VERSION form of registered models; choose another",
                                 "lora_name")
        if not (Path(folder) / "adapter_config.json").is_file():
            raise AdapterRefused(f"lora_path: {folder} is not a folder with a peft adapter (adapter_config.json)", "lora_path")
        loaded = self.routes[self.base_id].loaded
        try:
            adapter = loaded.add_adapter(Path(folder))
        except (ValueError, RuntimeError, KeyError, TypeError, OSError) as error:  # peft's ways to refuse an adapter
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else type(error).__name__)
            raise AdapterRefused(f"lora_path: the adapter in {folder} does not fit the base model {self.base_id}: {reason}",
                                 "lora_path") from error
        self.routes[model_id] = Route(model_id, loaded, adapter)
        return self.routes[model_id]

    def remove_adapter(self, model_id: str) -> Route:
        """Stop serving the adapter ``model_id`` and free its weights (on the decode thread);
        ModelNotFound for an id not served, AdapterRefused for a model that is not an adapter."""
        route = self.routes.get(model_id)
        if route is None:
            raise ModelNotFound(model_id)
        if route.adapter is None:
            raise AdapterRefused(f"{model_id!r} is not a LoRA adapter; only adapters can be unloaded", "lora_name")
        del self.routes[model_id]
        route.loaded.remove_adapter(route.adapter)
        return route
