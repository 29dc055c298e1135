"""Agent programs through the recording endpoint, in process on the tiny model: the OpenAI SDK and a LangGraph graph
get answers sampled from the policy, every call's tokens are recorded as sampled, and a program that fails, hangs or
never calls costs only its episode."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from palaestra.agents.program import ProgramAgent, program_rewards
from palaestra.models.loading import build_tiny_model
from palaestra.rollout.hf import HFGenerator, SamplingParams
from palaestra.tasks.base import Example
from tests.recipes import agent_programs

EXAMPLES = [Example("What is 2 + 3?", "5"), Example("What is 1 + 1?", "2")]


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model()
    generator = HFGenerator(model, tokenizer)
    generator.sampled = []
    real = generator.generate_ids

    def spy(prefixes, num_samples, sampling, stop_strings=None):  # what the sampler returned, to compare with
        out = real(prefixes, num_samples, sampling, stop_strings)
        generator.sampled.extend((tuple(p), tuple(ids)) for p, (ids, _) in zip(prefixes, out))
        return out

    generator.generate_ids = spy
    return generator


def _run(generator, program, **kwargs):
    agent = ProgramAgent(generator, program, **kwargs)
    try:
        started = time.monotonic()
        return agent.run_episodes(EXAMPLES, 2, SamplingParams(8, temperature=1.0)), agent.figures(), time.monotonic() - started
    finally:
        agent.close()


@pytest.mark.parametrize("program", [agent_programs.openai_agent, agent_programs.langgraph_agent])
def test_calls_are_recorded_as_sampled(generator, program):
    generator.sampled.clear()
    batch, figures, _ = _run(generator, program)
    assert figures == {"program/calls_per_episode": 2.0, "program/failed_share": 0.0, "program/no_call_share": 0.0}
    assert batch.row_episode.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and batch.rewards == [None] * 4
    rollout = batch.rollout
    recorded = set()
    for row in range(rollout.completion_ids.shape[0]):
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist()
        ids = rollout.completion_ids[row][rollout.completion_mask[row].bool()].tolist()
        assert rollout.trained_mask[row].tolist() == rollout.completion_mask[row].tolist()
        recorded.add((tuple(prompt), tuple(ids)))
    assert recorded == set(generator.sampled)  # every sampled call is a training row, token for token
    # the program read the decoded sampled tokens: its answer is the last call's text (cut at the openai agent's stop)
    tokenizer = generator.tokenizer
    for index, episode in enumerate(batch.episodes):
        prompt, ids, end = episode.calls[-1]
        text = tokenizer.decode(ids[:-1] if end == "stop" else ids, skip_special_tokens=True)
        if program is agent_programs.openai_agent:
            text = text.split("\n")[0]
            assert "What is" in tokenizer.decode(episode.calls[1][0]) and list(episode.calls[0][1][:1]) != []
        assert batch.answers[index] == text


def test_a_program_that_returns_its_reward(generator):
    batch, _, _ = _run(generator, agent_programs.reward_agent)
    assert all(reward in (0.0, 1.0) for reward in batch.rewards)
    rewards, components = program_rewards(batch, {"answer": [e.answer for e in EXAMPLES for _ in range(2)],
                                                  "prompt": [[]] * 4}, {"correctness": 1.0})
    assert rewards.tolist() == batch.rewards and components["program"] == batch.rewards


@pytest.mark.parametrize("program, failure", [
    (agent_programs.raising_agent, "RuntimeError: the agent's own bug"),
    (agent_programs.none_agent, "the program returned NoneType, not a reward (a number) or an answer (a str)"),
    (agent_programs.silent_agent, "the program never called the endpoint"),
    (agent_programs.slow_agent, "timed out after agent.program_timeout_s=2"),
])
def test_a_failing_program_costs_only_its_episode(generator, program, failure):
    batch, figures, seconds = _run(generator, program, timeout_s=2)
    assert seconds < 10  # never a hung run
    assert [e.failure for e in batch.episodes] == [failure] * 4 and batch.rewards == [0.0] * 4
    if program is agent_programs.silent_agent:  # no call at all: one empty row that trains nothing
        assert figures["program/no_call_share"] == 1.0 and int(batch.rollout.sampled_mask.sum()) == 0
    else:
        assert figures["program/calls_per_episode"] == 1.0


def test_endpoint_errors_are_one_line(generator):
    agent = ProgramAgent(generator, agent_programs.silent_agent, max_calls=1)
    try:
        with agent.endpoint.lock:
            agent.endpoint.open["e1"] = 1  # this episode has made its one call
        url = agent.endpoint.base_url
        message = {"model": "policy", "messages": [{"role": "user", "content": "hi"}]}
        cases = [(url("nope"), message, 404, "episode nope is not running"),
                 (url("e1"), message, 429, "agent.program_max_calls=1"),
                 (url("e1"), {**message, "stream": True}, 400, "stream=true is not supported"),
                 (url("e1"), {**message, "tools": [{"type": "function"}]}, 400, "tools are not supported"),
                 (url("e1"), {"model": "policy"}, 400, "messages")]
        for base, body, status, text in cases:
            response = httpx.post(f"{base}/chat/completions", json=body, timeout=10)
            error = response.json()["error"]["message"]
            assert response.status_code == status and text in error and "\n" not in error, (status, error)
        assert httpx.get(f"{url('e1')}/models", timeout=10).json()["data"][0]["id"] == "policy"
    finally:
        agent.close()
