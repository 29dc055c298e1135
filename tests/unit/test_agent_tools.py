"""Tools: schemas from functions, the shipped calculator / python / search, and calls that fail without failing the run."""

from __future__ import annotations

import time

import pytest

from palaestra.agents.tools import SHIPPED_TOOLS, calculator, call_tool, resolve_tools, tool_from_function
from palaestra.config.errors import ConfigError


def weather(city: str, days: int = 1) -> str:
    """Forecast the weather.

    Args:
        city: Where.
        days: How many days ahead.
    """
    return f"{city}: sun for {days} day(s)"


def no_docstring(x: int) -> int:
    return x


def sleeper(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "awake"


def raiser(text: str) -> str:
    """Always fails.

    Args:
        text: Anything.
    """
    raise RuntimeError("the backend is down")


def test_schema_from_signature_and_docstring():
    tool = tool_from_function(weather)
    assert tool.schema == {"type": "function", "function": {
        "name": "weather", "description": "Forecast the weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Where."},
                                                        "days": {"type": "integer", "description": "How many days ahead."}},
                       "required": ["city"]}}}
    assert tool.main_parameter == "city"
    assert call_tool(tool, {"city": "Oslo", "days": 2}, timeout_s=5).text == "Oslo: sun for 2 day(s)"


def test_a_function_without_a_schema_is_one_line():
    with pytest.raises(ConfigError) as error:
        tool_from_function(no_docstring)
    assert "no_docstring" in str(error.value) and "docstring" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("expression, expected", [
    ("48213 + 99812", "148025"),
    ("98765432109876543210 * 12345678901234567890", str(98765432109876543210 * 12345678901234567890)),
    ("10 / 4", "2.5"),
    ("(3 - 10) * 2", "-14"),
    ("2 ** 10", "1024"),
    ("7 // 2 + 7 % 2", "4"),
    ("1,234 + 1", "1235"),
    ("0.1 + 0.2", "0.3"),  # exact decimals, not binary floats
])
def test_calculator_is_exact(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression, message", [
    ("1 / 0", "division by zero"),
    ("__import__('os').system('true')", "not arithmetic"),
    ("2 ** 100000", "too large"),
    ("1 +", "SyntaxError"),
])
def test_calculator_errors_are_results(expression, message):
    result = call_tool(tool_from_function(calculator), {"expression": expression}, timeout_s=5)
    assert not result.ok and result.text.startswith("error:") and message in result.text


def test_bad_arguments_a_raising_tool_and_a_hung_tool_are_error_results():
    tool = tool_from_function(weather)
    assert call_tool(tool, {"town": "Oslo"}, 5).text == "error: unknown argument(s) town; weather takes city, days"
    assert call_tool(tool, {}, 5).text == "error: missing argument(s) city; weather takes city, days"
    failed = call_tool(tool_from_function(raiser), {"text": "x"}, 5)
    assert (failed.ok, failed.text) == (False, "error: RuntimeError: the backend is down")
    started = time.monotonic()
    hung = call_tool(tool_from_function(sleeper), {"seconds": 5}, timeout_s=0.3)
    assert time.monotonic() - started < 2 and (hung.ok, hung.text) == (False, "error: sleeper took longer than 0.3 s")


def test_long_results_are_cut():
    result = call_tool(tool_from_function(calculator), {"expression": "10 ** 500"}, 5, max_chars=20)
    assert result.text == "1" + "0" * 19 + " ..."


def test_python_runs_in_the_sandbox():
    tool = resolve_tools(["python"])[0]
    assert call_tool(tool, {"code": "print(sum(range(101)))"}, 20).text == "5050"
    assert "ZeroDivisionError" in call_tool(tool, {"code": "1 / 0"}, 20).text


def test_search_reads_the_shipped_docs_index():
    tool = resolve_tools(["search"])[0]
    assert tool.schema["function"]["parameters"]["required"] == ["query"]
    text = call_tool(tool, {"query": "pass statement"}, 20).text
    assert text.startswith("[1] ") and "null operation" in text


def test_resolve_tools_names_what_is_wrong():
    assert [t.name for t in resolve_tools(list(SHIPPED_TOOLS))] == ["calculator", "python", "search"]
    assert resolve_tools(["tests.unit.test_agent_tools:weather"])[0].name == "weather"
    for names, message in [(["abacus"], "'abacus' is not a tool"), (["no.such.module:f"], "could not be imported"),
                           (["tests.unit.test_agent_tools:no_docstring"], "JSON schema cannot be built"),
                           (["calculator", "calculator"], "twice")]:
        with pytest.raises(ConfigError, match=message):
            resolve_tools(names)


def test_a_search_index_folder_without_an_index_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is not a retrieval index"):
        resolve_tools(["search"], search_index=str(tmp_path))
