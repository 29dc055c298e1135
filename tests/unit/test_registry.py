"""The model registry, chat evaluation, the offline replay gate and policy versions, on a real store.

Every test talks to a real SQLite MLflow store in a temporary folder, with registered versions
built here: a tiny model folder (``save_pretrained`` with its tokenizer) logged as the ``model``
artifact of a run, then ``register_model``.

How the PASS case stays honest: a random tiny model writes bytes, not plans, so it can only ever
fail the hard constraints. Rather than stubbing generation, ``knowing_model`` *teaches* a tiny
model the answer: the accepted plan of the replayed test row becomes one token of the byte-level
vocabulary, and a few dozen Adam steps (well under a second) make the model answer that token and
then end its turn. Replay then runs for real on it: registry download, ``from_pretrained``, chat
template, batched greedy generation, and planner metrics that re-check the plan against the
catalogue. The gate rule itself is also tested on hand-made metric dicts.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from palaestra.config import ConfigError
from palaestra.evaluation.chat_eval import (
    chat_metrics,
    evaluate_chat,
    generate_answers,
    prompt_messages,
    reference_answer,
)
from palaestra.models import build_tiny_model
from palaestra.planner import load_planner_split, make_planner_dataset
from palaestra.registry import (
    active_policy,
    create_policy_version,
    download_model,
    list_models,
    list_policy_versions,
    open_client,
    promote,
    register_model,
    replay,
    replay_gate,
    resolve_version,
    retire,
)
from palaestra.tracking import MlflowTracker

DATE = "2026-01-15"


# ------------------------------------------------------------------------------------ helpers
def knowing_model(answer: str, messages: list[dict], max_steps: int = 300):
    """A tiny model whose greedy answer to ``messages`` is ``answer`` (taught as a single token)."""
    model, tokenizer = build_tiny_model(vocab=[answer])
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target = [tokenizer.convert_tokens_to_ids(answer), tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + target])
    labels = ids.clone()
    labels[:, : len(prompt_ids)] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread (and shares the CPU kindly)
    try:
        for _ in range(max_steps):
            out = model(input_ids=ids, labels=labels)
            predicted = out.logits[0, len(prompt_ids) - 1 : -1].argmax(-1).tolist()
            if predicted == target and out.loss.item() < 1e-2:
                break
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    assert predicted == target, "the tiny model did not learn the answer"
    return model.eval(), tokenizer


def save_model(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def register_folder(uri: str, folder: Path, name: str, tags: dict | None = None) -> str:
    """Log ``folder`` as the ``model`` artifact of a new training run and register it; the version."""
    tracker = MlflowTracker("planner_training", run_name=folder.name, tracking_uri=uri)
    tracker.set_tags({"task": "planner", "dataset_version": DATE})
    tracker.client.log_artifacts(tracker.run_id, str(folder), "model")
    tracker.end()
    return register_model(tracker, tracker.run_id, name, tags=tags)


def planner_fixture(root: Path) -> dict:
    """A store with ``planner_model`` v1 (random tiny) and v2 (knows test row 0), and the dataset."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    dataset = make_planner_dataset(root, date=DATE, n_train=4, n_val=2, n_test=2)
    row = load_planner_split(dataset, "test")[0]
    random_folder = save_model(*build_tiny_model(), root / "random_model")
    knowing_folder = save_model(*knowing_model(reference_answer(row), prompt_messages(row)), root / "knowing_model")
    v1 = register_folder(uri, random_folder, "planner_model", tags={"note": "random"})
    v2 = register_folder(uri, knowing_folder, "planner_model")
    return {"uri": uri, "dataset": dataset, "row": row, "random": random_folder, "knowing": knowing_folder,
            "random_version": v1, "knowing_version": v2}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One migrated store for the module (a new SQLite store takes seconds to migrate)."""
    return planner_fixture(tmp_path_factory.mktemp("registry"))


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PALAESTRA_CACHE", str(tmp_path / "cache"))  # downloads never land in the home folder


# ------------------------------------------------------------------------------------ registry
def test_register_and_list(store):
    versions = list_models(store["uri"])
    assert [(v.name, v.version) for v in versions] == [("planner_model", "1"), ("planner_model", "2")]
    first = versions[0]
    run = MlflowClient(tracking_uri=store["uri"]).get_run(first.run_id)
    assert first.source == f"{run.info.artifact_uri}/model"
    assert first.created_at > 0 and first.created_at <= versions[1].created_at
    # the run's provenance tags travel with the version, next to the ones given
    assert first.tags["dataset_version"] == DATE and first.tags["task"] == "planner" and first.tags["note"] == "random"
    assert list_models(store["uri"], name="planner_model") == versions
    with pytest.raises(ConfigError, match="unknown registered model 'nope'; registered: planner_model"):
        list_models(store["uri"], name="nope")


def test_register_refuses_unknown_run_and_missing_artifact(store):
    client = open_client(store["uri"])
    with pytest.raises(ConfigError, match="no MLflow run 'deadbeef'"):
        register_model(client, "deadbeef", "planner_model")
    run_id = client.create_run(client.get_experiment_by_name("planner_training").experiment_id).info.run_id
    with pytest.raises(ConfigError, match="has no artifact folder 'model'"):
        register_model(client, run_id, "planner_model")


def test_missing_store_is_an_error_not_a_new_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MLflow store at"):
        open_client(f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()


def test_resolve_version_by_number_and_alias(store):
    client = open_client(store["uri"])
    assert resolve_version(client, "planner_model", 2).version == 2
    with pytest.raises(ConfigError, match=r"model 'planner_model' has no version '9' \(versions: 1, 2"):
        resolve_version(client, "planner_model", "9")
    with pytest.raises(ConfigError, match="has no version 'staging'"):
        resolve_version(client, "planner_model", "staging")


def test_download_loads_with_transformers(store, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = download_model("planner_model", store["knowing_version"], store["uri"])
    assert folder.is_relative_to(tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and len(tokenizer) == model.config.vocab_size  # the taught token included
    source = AutoModelForCausalLM.from_pretrained(store["knowing"])
    for (name, a), (_, b) in zip(model.state_dict().items(), source.state_dict().items()):
        assert torch.equal(a, b), name
    # a second call reuses the complete download
    marker = folder / ".palaestra_download.json"
    stamp = marker.stat().st_mtime_ns
    assert download_model("planner_model", "2", store["uri"]) == folder and marker.stat().st_mtime_ns == stamp
    # an explicit destination works too
    assert (download_model("planner_model", "1", store["uri"], dst=tmp_path / "v1") / "config.json").is_file()


# ------------------------------------------------------------------------------------ chat evaluation
def test_prompt_and_reference_of_chat_rows(store):
    row = store["row"]
    assert [m["role"] for m in prompt_messages(row)] == ["system", "user"]
    assert reference_answer(row) == row["messages"][-1]["content"]
    assert reference_answer({"prompt": "2+2?", "completion": "4"}) == "4"


def test_generate_answers_batched_equals_one_by_one():
    model, tokenizer = build_tiny_model()
    model.train()
    tokenizer.padding_side = "right"  # as a training collator might leave it
    rows = [{"prompt": "hi"}, {"prompt": "a much longer question, padded on the left"}, {"prompt": "2+2?"}]
    batched = generate_answers(model, tokenizer, rows, max_new_tokens=6, batch_size=3)
    single = [generate_answers(model, tokenizer, [row], max_new_tokens=6, batch_size=1)[0] for row in rows]
    assert batched == single and len(batched) == 3
    assert model.training and tokenizer.padding_side == "right"  # left as they were


def test_evaluate_chat_planner_and_exact_match(store):
    from palaestra.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("hf", path=str(store["knowing"]))
    rows: list = []
    metrics = evaluate_chat(model, tokenizer, [store["row"]], "planner", max_new_tokens=4, rows=rows)
    # the taught answer is the accepted plan: every per-example metric is perfect
    assert metrics["constraint_respect"] == 1.0 and metrics["plan_alignment"] == 1.0
    assert metrics["edit_distance_score"] == 1.0 and metrics["parse_rate"] == 1.0
    assert rows[0]["prediction"] == reference_answer(store["row"]) and rows[0]["violations"] == ""
    # other data: exact match after whitespace normalisation
    plain = {"messages": store["row"]["messages"][:2] + [{"role": "assistant", "content": "  " + rows[0]["prediction"] + "\n"}]}
    assert evaluate_chat(model, tokenizer, [plain], "qa", max_new_tokens=4) == {"exact_match": 1.0}
    assert chat_metrics(["a  b", "c"], [{"prompt": "", "completion": "a b"}, {"prompt": "", "completion": "d"}], "qa") == {
        "exact_match": 0.5}
    with pytest.raises(ValueError, match="lacks the columns"):
        chat_metrics(["{}"], [plain], "planner")


# ------------------------------------------------------------------------------------ the gate
def test_gate_rule_on_hand_made_metrics():
    base = {"constraint_respect": 1.0, "plan_alignment": 0.80, "edit_distance_score": 0.60, "diversity": 0.5,
            "leftovers": 0.40}
    # equal to the baseline: passes
    assert replay_gate(dict(base), base) == (True, [])
    # 0.77 >= 0.95 * 0.80 = 0.76 and leftovers 0.42 <= 0.40 / 0.95 = 0.421: within tolerance
    assert replay_gate({**base, "plan_alignment": 0.77, "leftovers": 0.42}, base)[0]
    # 0.75 < 0.76: a soft failure; 0.43 > 0.421: lower-is-better failure; one broken plan: hard failure
    passed, reasons = replay_gate({**base, "plan_alignment": 0.75, "leftovers": 0.43, "constraint_respect": 0.9}, base)
    assert not passed and len(reasons) == 3
    assert reasons[0].startswith("hard metric constraint_respect = 0.9")
    # no baseline: only the hard rule
    assert replay_gate({"constraint_respect": 1.0, "plan_alignment": 0.0}, None) == (True, [])
    # other tasks: exact match is the soft metric, no hard one
    assert replay_gate({"exact_match": 0.5}, {"exact_match": 0.5}, "qa") == (True, [])
    assert not replay_gate({"exact_match": 0.4}, {"exact_match": 0.5}, "qa")[0]


# ------------------------------------------------------------------------------------ replay
def test_replay_passes_a_model_that_keeps_the_constraints(store):
    uri, client = store["uri"], MlflowClient(tracking_uri=store["uri"])
    result = replay("planner_model", store["knowing_version"], store["dataset"], baseline=store["random_version"],
                    tracking_uri=uri, max_examples=1, max_new_tokens=8, device="cpu")
    assert result.passed and result.reasons == [] and result.num_examples == 1
    assert result.dataset_version == DATE and result.data_name == "planner" and not result.baseline_cached
    assert result.candidate["constraint_respect"] == 1.0 and result.baseline_metrics["constraint_respect"] == 0.0
    tags = client.get_model_version("planner_model", store["knowing_version"]).tags
    assert tags["status"] == "candidate" and tags["gate"] == "pass"
    assert tags["replay_run_id"] == result.run_id and tags["replay_dataset_version"] == DATE
    run = client.get_run(result.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "planner_replay"
    assert run.data.tags["gate"] == "pass"
    assert run.data.params["model"] == "planner_model" and run.data.params["dataset_version"] == DATE
    assert run.data.params["baseline"] == store["random_version"]
    assert run.data.metrics["candidate/constraint_respect"] == 1.0 and "baseline/plan_alignment" in run.data.metrics
    assert {"predictions.json", "gate.json"} <= {a.path for a in client.list_artifacts(result.run_id)}
    # the baseline's metrics were cached on its version: a second replay with the same settings reuses them
    again = replay("planner_model", store["knowing_version"], store["dataset"], baseline=store["random_version"],
                   tracking_uri=uri, max_examples=1, max_new_tokens=8, device="cpu")
    assert again.baseline_cached and again.baseline_metrics == result.baseline_metrics and again.passed


def test_replay_rejects_a_random_model(store):
    client = MlflowClient(tracking_uri=store["uri"])
    result = replay("planner_model", store["random_version"], store["dataset"], baseline=store["knowing_version"],
                    tracking_uri=store["uri"], max_examples=1, max_new_tokens=8, device="cpu")
    assert not result.passed
    assert any(r.startswith("hard metric constraint_respect") for r in result.reasons)
    assert any(r.startswith("plan_alignment") for r in result.reasons)
    tags = client.get_model_version("planner_model", store["random_version"]).tags
    assert tags["status"] == "rejected" and tags["gate"] == "fail"
    assert client.get_run(result.run_id).data.tags["gate"] == "fail"


def test_replay_errors_before_loading_anything(store, tmp_path):
    uri = store["uri"]
    with pytest.raises(ConfigError, match="unknown registered model 'nope'"):
        replay("nope", 1, store["dataset"], tracking_uri=uri)
    with pytest.raises(ConfigError, match="has no version '7'"):
        replay("planner_model", 7, store["dataset"], tracking_uri=uri)
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        replay("planner_model", 1, tmp_path / "2020-01-01", tracking_uri=uri)
    (tmp_path / "2020-01-02").mkdir()
    with pytest.raises(FileNotFoundError, match="test.jsonl not found"):
        replay("planner_model", 1, tmp_path / "2020-01-02", tracking_uri=uri)


# ------------------------------------------------------------------------------------ policy versions
def test_policy_versions_lifecycle(store, tmp_path):
    uri, name = store["uri"], "policy_model"
    folder = store["random"]
    v1, v2 = register_folder(uri, folder, name), register_folder(uri, folder, name)
    client = MlflowClient(tracking_uri=uri)
    assert list_policy_versions(name, tracking_uri=uri) == [] and active_policy(name, tracking_uri=uri) is None

    # auto-incremented, status candidate, alias policy-vP -> its model version
    assert create_policy_version(name, v1, temperature=0.2, max_new_tokens=64, tracking_uri=uri) == 1
    assert create_policy_version(name, v2, tracking_uri=uri) == 2
    assert create_policy_version(name, v2, temperature=0.0, tracking_uri=uri) == 3  # same weights, greedy
    listed = list_policy_versions(name, tracking_uri=uri)
    assert [(p.policy_version, p.model_version, p.status) for p in listed] == [
        (1, v1, "candidate"), (2, v2, "candidate"), (3, v2, "candidate")]
    assert (listed[0].temperature, listed[0].max_new_tokens) == (0.2, 64)
    assert client.get_registered_model(name).aliases == {"policy-v1": 1, "policy-v2": 2, "policy-v3": 2}

    # promote: one active at a time, the previous one retired, alias "active" follows
    assert promote(name, 1, tracking_uri=uri).status == "active"
    assert client.get_model_version_by_alias(name, "active").version == 1
    promote(name, 2, tracking_uri=uri)
    statuses = {p.policy_version: p.status for p in list_policy_versions(name, tracking_uri=uri)}
    assert statuses == {1: "retired", 2: "active", 3: "candidate"}
    assert client.get_model_version_by_alias(name, "active").version == 2
    assert active_policy(name, tracking_uri=uri).policy_version == 2
    # rollback: a retired policy can be promoted again
    promote(name, 1, tracking_uri=uri)
    assert {p.policy_version: p.status for p in list_policy_versions(name, tracking_uri=uri)} == {
        1: "active", 2: "retired", 3: "candidate"}

    # retiring the active one leaves none active and removes the alias
    assert retire(name, 1, tracking_uri=uri).status == "retired"
    assert active_policy(name, tracking_uri=uri) is None and "active" not in client.get_registered_model(name).aliases

    # a model version the replay gate rejected is not promoted without force
    client.set_model_version_tag(name, v2, "status", "rejected")
    with pytest.raises(ConfigError, match="failed the replay gate"):
        promote(name, 3, tracking_uri=uri)
    assert promote(name, 3, force=True, tracking_uri=uri).status == "active"

    with pytest.raises(ConfigError, match=r"has no policy version 9 \(policy versions: 1, 2, 3\)"):
        promote(name, 9, tracking_uri=uri)
    with pytest.raises(ConfigError, match="has no version '5'"):
        create_policy_version(name, 5, tracking_uri=uri)
    with pytest.raises(ConfigError, match="temperature=-1"):
        create_policy_version(name, v1, temperature=-1, tracking_uri=uri)


@pytest.mark.parametrize("name", ["palaestra.evaluation.chat_eval", "palaestra.registry.policies",
                                  "palaestra.registry.replay"])
def test_docstring_examples(name):
    # import_module: the package's ``replay`` attribute is the function, the module lives in sys.modules
    assert doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS).failed == 0
