"""Tool-calling episodes keep the sampled tokens exact: the trained sequence is the sampled ids and the results' ids,
in order, and the loss mask covers exactly the model's tokens; on real chat templates (Qwen2.5, Qwen3, Llama 3.1 as
TRL ships them) and on the plain format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from palaestra.agents.episodes import ToolAgent
from palaestra.agents.formats import ChatTemplateFormat, PlainFormat, tool_format
from palaestra.agents.tools import resolve_tools
from palaestra.config.errors import ConfigError
from palaestra.models.loading import build_tiny_model
from palaestra.rollout.decode import StopStrings
from palaestra.rollout.hf import HFGenerator, SamplingParams

LLAMA_TOKENS = ["<|eot_id|>", "<|eom_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>",
                "<|python_tag|>"]
QUESTION = [{"role": "user", "content": "What is 48213 + 99812?"}]


def _template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


def _tokenizer(template: str | None):
    """The tiny byte-level tokenizer, with a real chat template (and Llama 3's special tokens) when given."""
    _, tokenizer = build_tiny_model(vocab=LLAMA_TOKENS)
    if template is not None:
        tokenizer.chat_template = _template(template)
    return tokenizer


class ScriptedSampler:
    """Stands in for the sampler only: each row's turns are scripted texts; it returns their ids (the turn's end as a
    sampler reports it) and records every prefix it is asked to continue."""

    def __init__(self, tokenizer, stop_ids: list[int], turns: list[list[str]]):
        self.tokenizer, self.stop_ids, self.turns = tokenizer, stop_ids, [list(t) for t in turns]
        self.prefixes: list[list[int]] = []
        self.returned: list[list[list[int]]] = [[] for _ in turns]
        self._rows: list[int] = []

    def generate_ids(self, prefixes, num_samples, sampling, stop_strings=None):
        if not self._rows:  # the first turn: every row
            self._rows = list(range(len(prefixes) * num_samples))
            rows, prefixes = self._rows, [p for p in prefixes for _ in range(num_samples)]
        else:  # later turns: the rows still going, in order
            rows = [row for row in self._rows if self.turns[row]]
        self.prefixes.extend(prefixes)
        out = []
        for row in rows:
            text = self.turns[row].pop(0)
            end = "string" if stop_strings is not None and text.endswith("</call>") else "stop"
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + ([self.stop_ids[0]] if end == "stop" else [])
            self.returned[row].append(ids)
            out.append((ids, end))
        return out


CHAT_CALL = {
    "qwen2_5": '<tool_call>\n{"name": "calculator", "arguments": {"expression": "48213 + 99812"}}\n</tool_call>',
    "qwen3": '<tool_call>\n{"name": "calculator", "arguments": {"expression": "48213 + 99812"}}\n</tool_call>',
    "llama3_1": '{"name": "calculator", "parameters": {"expression": "48213 + 99812"}}',
}


@pytest.mark.parametrize("template", ["qwen2_5", "qwen3", "llama3_1", None])
def test_the_trained_sequence_is_the_sampled_ids_and_the_result_ids(template):
    tokenizer = _tokenizer(template)
    llama = template is not None and template.startswith("llama")
    stop_ids = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>"]) if llama else [tokenizer.eos_token_id]
    tools = resolve_tools(["calculator"])
    form = tool_format("auto", tokenizer, tools, stop_ids)
    assert isinstance(form, ChatTemplateFormat if template else PlainFormat)
    call = CHAT_CALL[template] if template else "<call>calculator: 48213 + 99812</call>"
    turns = [
        [call, "The sum is <answer>148025</answer>"],  # a call, then the answer
        ["<answer>1</answer>"],  # the answer at once
        [call.replace("48213", "4821x"), call, "<answer>148025</answer>"],  # a call that fails, a good one, the answer
        [call, call, call],  # calls past max_turns=2: the third turn is the last
    ]
    sampler = ScriptedSampler(tokenizer, stop_ids, turns)
    agent = ToolAgent(sampler, tools, form, max_turns=2)
    rollout = agent.generate([QUESTION, QUESTION], 2, SamplingParams(64))

    prompt = form.prompt_ids(QUESTION)
    for row, episode in enumerate(agent.last_episodes):
        expected, sampled_mask = [], []
        for index, ids in enumerate(sampler.returned[row]):
            expected += ids
            sampled_mask += [1] * len(ids)
            if index < len(episode.calls):  # the result of this turn's call follows it
                result = form.result_ids(episode.calls[index].result)
                expected += result
                sampled_mask += [0] * len(result)
        length = len(expected)
        assert rollout.completion_ids[row, :length].tolist() == expected
        assert rollout.trained_mask[row].tolist() == sampled_mask + [0] * (rollout.completion_ids.shape[1] - length)
        assert rollout.completion_mask[row].tolist() == [1] * length + [0] * (rollout.completion_ids.shape[1] - length)
        assert rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist() == prompt
    # each later turn continued the exact tokens so far: the prompt, the sampled ids, the result ids
    continued = sampler.prefixes[4:]
    assert continued[0] == prompt + agent.last_episodes[0].ids[: len(continued[0]) - len(prompt)]
    calls = [[(c.result, c.ok) for c in e.calls] for e in agent.last_episodes]
    assert calls[0] == [("148025", True)] and calls[1] == []
    assert calls[2][0][1] is False and "SyntaxError" in calls[2][0][0] and calls[2][1] == ("148025", True)
    assert len(calls[3]) == 2  # max_turns
    assert rollout.texts[0].endswith("<answer>148025</answer>") and rollout.texts[1] == "<answer>1</answer>"
    assert "148025" in tokenizer.decode(form.result_ids("148025"))
    assert agent.figures() == {"tool/calls_per_episode": 5 / 4, "tool/valid_call_share": 4 / 5, "tool/used_share": 3 / 4}


def test_chat_template_tool_turns_follow_the_template():
    qwen = ChatTemplateFormat(_tokenizer("qwen3"), resolve_tools(["calculator"]), [2])
    assert qwen.tool_turn("7") == "\n<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    tokenizer = _tokenizer("llama3_1")
    llama = ChatTemplateFormat(tokenizer, resolve_tools(["calculator"]), tokenizer.convert_tokens_to_ids(["<|eot_id|>"]))
    assert llama.tool_turn('say "hi"') == ('<|start_header_id|>ipython<|end_header_id|>\n\n"say \\"hi\\""<|eot_id|>'
                                           "<|start_header_id|>assistant<|end_header_id|>\n\n")  # Llama 3.1's JSON string
    assert llama.parse("The answer is 3.") is None
    assert llama.parse('{"name": "calculator", "parameters": {"expression": "1+2"}}').arguments == {"expression": "1+2"}
    assert qwen.parse("<tool_call>\n{not json}\n</tool_call>").error == "error: the tool call is not valid JSON"
    assert "no tool 'abacus'" in qwen.parse('<tool_call>{"name": "abacus", "arguments": {}}</tool_call>').error


def test_plain_format_reads_calls_and_shows_a_worked_exchange():
    _, tokenizer = build_tiny_model()
    form = PlainFormat(tokenizer, resolve_tools(["calculator"]), instruction="Give the final number inside <answer></answer>.")
    assert form.parse("<call>calculator: 2 + 3</call>").arguments == {"expression": "2 + 3"}
    assert form.parse('<call>calculator: {"expression": "2 * 3"}</call>').arguments == {"expression": "2 * 3"}
    assert form.parse("<call>abacus: 1</call>").error.startswith("error: no tool 'abacus'")
    assert form.example[1]["content"] == "<call>calculator: 1234 + 5678</call>\n<result>6912</result>\n<answer>6912</answer>"
    text = tokenizer.decode(form.prompt_ids([{"role": "system", "content": "Be brief."}, *QUESTION]))
    assert text.index("<call>calculator: EXPRESSION</call>") < text.index("Be brief.") < text.index("1234 + 5678") \
        < text.index("48213")
    assert tokenizer.decode(form.result_ids("5")) == "\n<result>5</result>\n"


def test_a_template_without_tools_is_one_line():
    _, tokenizer = build_tiny_model()
    with pytest.raises(ConfigError, match="does not render tools; use agent.format=plain"):
        tool_format("chat_template", tokenizer, resolve_tools(["calculator"]), [2])
    assert isinstance(tool_format("auto", tokenizer, resolve_tools(["calculator"]), [2]), PlainFormat)


def test_stop_strings_end_rows_in_the_real_decode_loop():
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model()
    generator = HFGenerator(model, tokenizer)
    chars = "etaoinshrd0123456789"
    stops = StopStrings(tokenizer, list(chars))  # 20 of 259 byte tokens: most of a random model's rows end at one
    prompts = [tokenizer("hello", add_special_tokens=False)["input_ids"], [5, 6, 7]]
    turns = generator.generate_ids(prompts, 8, SamplingParams(40, temperature=1.0), stops)
    ends = [end for _, end in turns]
    assert ends.count("string") >= 8
    for ids, end in turns:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if end == "string":
            assert text[-1] in chars and not set(text[:-1]) & set(chars)  # it stopped at the first one
        elif end == "stop":
            assert ids[-1] in generator.stop_ids and not set(text) & set(chars)
        else:
            assert len(ids) == 40 and not set(text) & set(chars)


def test_episodes_on_the_real_sampler_are_its_tokens():
    """No scripted turns: the tiny model samples, and each row is exactly what its sampler calls returned."""
    torch.manual_seed(1)
    model, tokenizer = build_tiny_model()
    generator = HFGenerator(model, tokenizer)
    returned = []
    real = generator.generate_ids

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        returned.append(out)
        return out

    generator.generate_ids = spy
    agent = ToolAgent(generator, resolve_tools(["calculator"]), PlainFormat(tokenizer, resolve_tools(["calculator"])))
    rollout = agent.generate([QUESTION], 4, SamplingParams(16, temperature=1.0))
    for row, (ids, _) in enumerate(returned[0]):
        assert rollout.completion_ids[row, : len(ids)].tolist() == ids
        assert int(rollout.trained_mask[row].sum()) == len(ids) == int(rollout.completion_mask[row].sum())


def test_a_teams_training_rows_keep_the_tool_mask():
    from palaestra.agents.episodes import Episode, episode_rollout
    from palaestra.rollout.tree import stack_rows

    tool_answers = episode_rollout([Episode([5], ids=[1, 9, 3], sampled=[1, 0, 1], answer_ids=[3], end="stop")],
                                   pad_id=0, decode=str)
    plain = episode_rollout([Episode([6, 7], ids=[4, 2], sampled=[1, 1], answer_ids=[4, 2], end="stop")], pad_id=0, decode=str)
    plain.trained_mask = None  # an answer without tools: every completion token is the policy's
    rows = stack_rows([(tool_answers, 0), (plain, 0)], pad_id=0)
    assert rows.trained_mask.tolist() == [[1, 0, 1], [1, 1, 0]]
    assert rows.completion_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
