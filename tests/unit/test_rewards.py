"""Reward functions with hand-checked values (the arithmetic is in the comments)."""

import doctest

import pytest

import palaestra.rewards
from palaestra.rewards import (
    REWARD_FUNCTIONS,
    answer_format_reward,
    combine_rewards,
    correctness_reward,
    qa_f1_reward,
    resolve_reward,
    snap_to_tier,
    tiered_code_reward,
    tiered_math_reward,
    tiered_qa_reward,
    tunix_answer,
    tunix_approx_format,
    tunix_exact_format,
    tunix_number,
)
from palaestra.rewards import correctness, qa, tiered, tunix_gsm8k
from palaestra.tasks import answers


@pytest.mark.parametrize("module", [palaestra.rewards, correctness, qa, tiered, tunix_gsm8k, answers])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0


# --- helpers -------------------------------------------------------------------------------------

def test_extraction_helpers():
    assert answers.extract_tagged_answer("<answer>1</answer> x <answer>\n2\n</answer>") == "2"
    assert answers.extract_tagged_answer("no tags") is None
    assert answers.extract_last_number("total: -3") == "-3"
    assert answers.extract_last_number("5-3") == "3"  # subtraction, not a negative number
    assert answers.extract_last_number("costs $1,234 or 2.5") == "2.5"
    assert answers.extract_last_number("costs $1,234.") == "1234"
    assert answers.extract_answer("<answer>x</answer> 7") == "x"  # tags win over numbers
    assert answers.numbers_equal("2.50", "2.5") and answers.numbers_equal("1/2", "0.5")
    # 1e11 + 1 must not pass as 1e11: the tolerance is absolute (1e-6), not relative.
    assert not answers.numbers_equal("100000000001", "100000000000")


# --- correctness ---------------------------------------------------------------------------------

def test_correctness_is_lenient_about_where_the_answer_is():
    completions = [
        "so the answer is <answer>42</answer>",  # tagged
        "6 * 7 = 42",                            # no tags: the last number
        "<answer>42.0</answer>",                 # numerically equal
        "<answer>$42 dollars</answer>",          # a number inside the tagged text
        "42, or maybe 41",                       # the last number is 41
        "<answer>41</answer> although 42",       # the tag wins over the later 42
        "no idea",
    ]
    assert correctness_reward(completions, answer=["42"] * 7) == [1, 1, 1, 1, 0, 0, 0]


def test_correctness_text_answers_and_unknown_columns():
    got = correctness_reward(["<answer>Paris.</answer>", "<answer>Lyon</answer>"],
                             answer=["paris", "paris"], question=["q", "q"], entry=[None, None])
    assert got == [1.0, 0.0]


def test_answer_format():
    completions = ["<answer>1</answer>", "1", "<answer>1</answer> <answer>2</answer>", "<answer>1"]
    assert answer_format_reward(completions, answer=["1"] * 4) == [1.0, 0.0, 0.0, 0.0]


# --- agent_tunix ---------------------------------------------------------------------------------

PERFECT = "<reasoning>6 * 7 = 42</reasoning>\n<answer>42</answer>"


def test_tunix_maximum_is_9_5():
    # 3.0 (exact format) + 4 * 0.5 (each tag once) + 3.0 (exact answer) + 1.5 (number) = 9.5
    total, parts = combine_rewards(
        [PERFECT], {"answer": ["42"]},
        {"tunix_exact_format": 1.0, "tunix_approx_format": 1.0, "tunix_answer": 1.0,
         "tunix_number": 1.0},
    )
    assert parts == {"tunix_exact_format": [3.0], "tunix_approx_format": [2.0],
                     "tunix_answer": [3.0], "tunix_number": [1.5]}
    assert total == [9.5]


def test_tunix_exact_format():
    completions = [
        PERFECT,
        "  " + PERFECT + "\n\n",                  # surrounding whitespace is fine
        PERFECT + " and more",                    # something after the answer block
        "<answer>42</answer>",                    # no reasoning block
        "<reasoning>r</reasoning><answer></answer>",  # empty answer
    ]
    assert tunix_exact_format(completions) == [3.0, 3.0, 0.0, 0.0, 0.0]


def test_tunix_approx_format():
    assert tunix_approx_format([
        PERFECT,                                       # 4 tags once: 4 * 0.5 = 2.0
        "<answer>42</answer>",                         # 2 once, 2 missing: 1.0 - 1.0 = 0.0
        "<answer>1</answer><answer>2</answer>",        # all 4 wrong counts: -2.0
        "plain",                                       # -2.0
        "<reasoning>a</reasoning><reasoning>",         # </reasoning> once, 3 wrong: 0.5 - 1.5
    ]) == [2.0, 0.0, -2.0, -2.0, -1.0]


def test_tunix_answer_tiers():
    def wrap(guess):
        return f"<reasoning>r</reasoning><answer>{guess}</answer>"

    cases = [
        ("100", 3.0),     # exact
        (" 100 ", 1.5),   # equal after stripping
        ("109", 0.5),     # ratio 1.09 in [0.9, 1.1]
        ("90", 0.5),      # ratio 0.90, inclusive
        ("115", 0.25),    # ratio 1.15 in [0.8, 1.2]
        ("80", 0.25),     # ratio 0.80, inclusive
        ("121", -1.0),    # ratio 1.21: wrong
        ("-100", -1.0),   # ratio -1
        ("a lot", -0.5),  # unparseable
    ]
    completions = [wrap(guess) for guess, _ in cases] + ["<answer>100</answer>"]  # no match: 0
    expected = [score for _, score in cases] + [0.0]
    assert tunix_answer(completions, answer=["100"] * len(completions)) == expected


def test_tunix_answer_zero_truth_does_not_divide_by_zero():
    completions = ["<reasoning>r</reasoning><answer>0.0</answer>",
                   "<reasoning>r</reasoning><answer>3</answer>"]
    assert tunix_answer(completions, answer=["0", "0"]) == [0.5, -1.0]


def test_tunix_number():
    completions = [
        "<answer>The answer is 42.0</answer>",  # first number after <answer>: 42.0 == 42
        "<answer>41 not 42</answer>",           # first number is 41
        "42",                                   # no <answer>
        "<answer>-7</answer>",                  # negative gold
        "<answer>1,234</answer>",               # thousands comma
    ]
    got = tunix_number(completions, answer=["42", "42", "42", "-7", "1234"])
    assert got == [1.5, 0.0, 0.0, 1.5, 1.5]


# --- AFlow 5-tier --------------------------------------------------------------------------------

def test_snap_to_tier():
    assert [snap_to_tier(x) for x in (0.0, 0.2, 0.4, 0.7, 1.0)] == [0.0, 0.2, 0.4, 0.7, 1.0]
    assert snap_to_tier(0.55) == 0.4  # |0.55 - 0.4| = |0.55 - 0.7| = 0.15: a tie goes down
    assert snap_to_tier(0.56) == 0.7
    assert snap_to_tier(1.0 - 0.7) == 0.2  # 0.30000000000000004 is a tie between 0.2 and 0.4: down
    assert snap_to_tier(-0.3) == 0.0 and snap_to_tier(1.7) == 1.0


def test_tiered_math_tiers():
    completions = ["<answer>200</answer>", "200.01", "195", "150", "1000", "<answer>x</answer>", ""]
    # relative errors vs 200: 0, 5e-5, 0.025, 0.25, 4.0, no number, no number
    assert tiered_math_reward(completions, answer=["200"] * 7) == [1.0, 1.0, 0.7, 0.4, 0.2, 0, 0]


def test_tiered_math_zero_truth():
    # With truth 0 the absolute error is used: 0 -> 1.0, 0.01 -> 0.7, 0.3 -> 0.4, 5 -> 0.2.
    got = tiered_math_reward(["0", "0.01", "0.3", "5"], answer=["0"] * 4)
    assert got == [1.0, 0.7, 0.4, 0.2]


def test_tiered_penalties_and_floor():
    completions = ["<answer>10</answer>"] * 5  # all correct: tier 1.0
    got = tiered_math_reward(
        completions, answer=["10"] * 5,
        operator_mismatch=[True, False, False, True, False],
        validation_failed=[False, True, False, True, False],
        runtime_error=[False, False, True, True, None],
    )
    # 1 - 0.4 = 0.6 -> 0.7;  1 - 0.2 = 0.8 -> 0.7;  1 - 0.3 = 0.7;
    # 1 - 0.4 - 0.2 - 0.3 = 0.1 -> tie between 0 and 0.2 -> 0;  no flags -> 1.0
    assert got == [0.7, 0.7, 0.7, 0.0, 1.0]
    # floor at 0: tier 0.2 (a wrong number) - 0.4 = -0.2 -> 0
    assert tiered_math_reward(["99"], answer=["10"], operator_mismatch=[True]) == [0.0]


def test_tiered_code():
    rates = [1.0, 0.99, 0.98, 0.75, 0.74, 0.5, 0.49, 0.2, 0.19, 0.0]
    got = tiered_code_reward(["code"] * 10, answer=[""] * 10, pass_rate=rates)
    assert got == [1.0, 1.0, 0.7, 0.7, 0.4, 0.4, 0.2, 0.2, 0.0, 0.0]
    # 0.75 pass rate (0.7) with a runtime error: 0.7 - 0.3 = 0.4
    assert tiered_code_reward(["c"], pass_rate=[0.75], runtime_error=[True]) == [0.4]


def test_tiered_qa():
    gold = "the Eiffel Tower in Paris"  # normalized: "eiffel tower in paris" (4 tokens)
    completions = [
        "<answer>Eiffel tower in Paris!</answer>",  # exact after normalization -> 1.0
        "It is the Eiffel Tower in Paris, France",  # contains the gold -> 0.7
        "<answer>Eiffel tower</answer>",            # contained in the gold -> 0.7
        "<answer>eiffel tower of paris</answer>",   # 3 common: p = 3/4, r = 3/4, F1 = 0.75 -> 0.4
        "<answer>a tower near paris city</answer>",  # 2 common: p = 2/4, r = 2/4, F1 = 0.5 -> 0.2
        "<answer>paris hotel guide for tourists</answer>",  # 1 common: p = 1/5, r = 1/4 -> 0.22
        "<answer>London</answer>",                  # F1 = 0 -> 0
    ]
    got = tiered_qa_reward(completions, answer=[gold] * 7)
    assert got == [1.0, 0.7, 0.7, 0.4, 0.2, 0.2, 0.0]
    # F1 = 2 * (1/5) * (1/4) / (1/5 + 1/4) = 0.1 / 0.45 = 0.222 > 0.2
    assert tiered.token_f1("paris hotel guide for tourists", gold) == pytest.approx(2 / 9)
    # whole words only: "4" is not contained in "14"
    assert tiered_qa_reward(["<answer>14</answer>"], answer=["4"]) == [0.0]


def test_tiered_qa_penalty():
    got = tiered_qa_reward(["<answer>paris</answer>"], answer=["Paris"], validation_failed=[True])
    assert got == [0.7]  # 1.0 - 0.2 = 0.8 -> 0.7


def test_qa_f1_against_the_best_accepted_span():
    completions = [
        # "bitwise and" (2 tokens) vs "bitwise and of its arguments" (5): p = 2/2, r = 2/5, F1 = 0.8 / 1.4 = 4/7
        "<answer>the bitwise AND</answer>",
        # the last block counts: "entire code block" (3) vs "entire current code block" (4): p = 1, r = 3/4, F1 = 6/7
        "<answer>globals</answer> no, <answer>The entire code block.</answer>",
        # no block: the whole completion, "it is bitwise and of its arguments" (7) vs 5: p = 5/7, r = 1, F1 = 10/12
        "It is the bitwise AND of its arguments",
        "<answer>a null operation</answer>",  # "null operation" == "null operation": 1.0
        "<answer></answer>",  # an empty answer shares no token: 0
    ]
    gold = [["the bitwise AND of its arguments"], ["the entire current code block"],
            ["the bitwise AND of its arguments"], ["nothing", "a null operation"], ["True"]]
    got = qa_f1_reward(completions, answers=gold, answer=[spans[0] for spans in gold])
    assert got == pytest.approx([4 / 7, 6 / 7, 10 / 12, 1.0, 0.0])
    # an example without accepted spans (a mixture's math row) is scored against its answer
    assert qa_f1_reward(["<answer>RuntimeError</answer>"], answers=[None], answer=["RuntimeError"]) == [1.0]
    assert resolve_reward("qa_f1") is qa_f1_reward


# --- table, resolution, combination --------------------------------------------------------------

def test_number_only_accepts_a_bare_number_and_nothing_else():
    from palaestra.rewards import number_only_reward

    # a bare number (sign, thousands commas, decimals, a final period) is the requested format
    assert number_only_reward(["42", "-7.", " 1,000 ", "2.5"]) == [1.0, 1.0, 1.0, 1.0]
    # anything around the number is not
    assert number_only_reward(["42 apples", "12 - 98 = 1", "", "The answer is 3."]) == [0.0, 0.0, 0.0, 0.0]


def test_reward_table_names():
    assert set(REWARD_FUNCTIONS) == {
        "correctness", "answer_format", "number_only", "tunix_exact_format", "tunix_approx_format",
        "tunix_answer", "tunix_number", "tiered_math", "tiered_code", "tiered_qa", "qa_f1", "planner_quality",
    }


def test_resolve_reward_by_name_and_import_path(tmp_path, monkeypatch):
    assert resolve_reward("tunix_answer") is tunix_answer
    assert resolve_reward("palaestra.rewards.tiered:tiered_qa_reward") is tiered_qa_reward
    # user code: a module of the user's own, on the path
    (tmp_path / "my_rewards.py").write_text(
        "def length_penalty(completions, **columns):\n"
        "    return [-len(c) / 100 for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = resolve_reward("my_rewards:length_penalty")
    assert reward(["abcd"], answer=["1"]) == [-0.04]


@pytest.mark.parametrize("name", ["no_such_reward", "palaestra.rewards:missing", "nope.mod:f"])
def test_resolve_reward_bad_name(name):
    with pytest.raises(ValueError) as error:
        resolve_reward(name)
    message = str(error.value)
    assert "\n" not in message and name in message
    if ":" not in name:
        assert "correctness" in message and "tiered_qa" in message  # lists the valid names


def test_combine_rewards_weights():
    completions = ["<answer>4</answer>", "4", "<answer>5</answer>"]
    total, parts = combine_rewards(completions, {"answer": ["4"] * 3},
                                   {"correctness": 2.0, "answer_format": 0.5})
    assert parts == {"correctness": [1.0, 1.0, 0.0], "answer_format": [1.0, 0.0, 1.0]}
    # 2 * 1 + 0.5 * 1 = 2.5;  2 * 1 + 0.5 * 0 = 2.0;  2 * 0 + 0.5 * 1 = 0.5
    assert total == [2.5, 2.0, 0.5]


def test_combine_rewards_zero_weight_still_logged():
    total, parts = combine_rewards(["4"], {"answer": ["4"]}, {"correctness": 1.0,
                                                              "answer_format": 0.0})
    assert total == [1.0] and parts["answer_format"] == [0.0]


def test_combine_rewards_rejects_wrong_length(monkeypatch):
    monkeypatch.setitem(REWARD_FUNCTIONS, "one_value", lambda completions, **columns: [1.0])
    with pytest.raises(ValueError, match="gave 1 values for 2"):
        combine_rewards(["a", "b"], {"answer": ["1", "2"]}, {"one_value": 1.0})
