"""The README documents every key of every schema, and only keys that exist; each method refuses the keys
of another in one line naming the method that reads them."""

from __future__ import annotations

import re

import pytest

from palaestra.config import ConfigError
from palaestra.jobs import COMMAND_SCHEMAS, compose_jobs, reader_of, reads, schema_keys, to_config
from palaestra.recipes.methods import METHODS
from palaestra.settings_reference import BEGIN, END, markdown
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
SECTIONS = ("model", "task", "algo", "train", "eval", "tracking", "env", "policy", "data", "export", "serve", "pipeline")


def test_the_readme_settings_reference_is_generated_from_the_schemas():
    block = README[README.index(BEGIN): README.index(END) + len(END)]
    assert block == markdown(), "README.md's settings reference is stale: python -m palaestra.settings_reference"


def test_every_key_of_every_schema_is_documented_and_every_documented_key_exists():
    documented = set(re.findall(r"^\| `([a-z_.0-9]+)` \|", README, re.M))
    schemas = [m.schema for m in METHODS.values()] + [schema for schema, _ in COMMAND_SCHEMAS.values()]
    every_key = {key for schema in schemas for key in schema_keys(schema)}
    assert every_key == documented
    assert all(doc for schema in schemas for doc in schema_keys(schema).values()), "a field without a docstring"
    # keys named anywhere else in the README (prose, commands) exist in some schema too
    named = set(re.findall(rf"`((?:{'|'.join(SECTIONS)})\.[a-z_0-9]+(?:\.[a-z_0-9]+)*)", README))
    named = {key for key in named if key.rsplit(".", 1)[1] not in ("log", "jsonl", "json", "yaml")}  # file names
    free = ("task.params.", "env.params.", "task.components.", "serve.named_models.", "policy.role_models.")
    missing = [key for key in named if not key.startswith(free) and not any(reads(s, key) for s in schemas)]
    assert not missing, f"the README names keys no schema has: {sorted(missing)}"


def _another_methods_key(name: str) -> list[tuple[str, str]]:
    """(a key another method reads and ``name`` does not, that method) for every other method."""
    own = schema_keys(METHODS[name].schema)
    found = []
    for other, method in METHODS.items():
        key = next((k for k in schema_keys(method.schema) if k not in own and "." in k
                    and not reads(METHODS[name].schema, k)), None)
        if other != name and key:
            found.append((key, other))
    return found


@pytest.mark.parametrize("name", list(METHODS))
def test_a_key_of_another_method_is_one_line_naming_its_reader(name):
    for key, other in _another_methods_key(name):
        with pytest.raises(ConfigError) as caught:
            (_, cfg), = compose_jobs([f"algo={name}", f"{key}=null"])
            to_config(cfg, check_values=False)
        message = str(caught.value)
        assert "\n" not in message and key.split(".")[0] in message
        assert f"algo={name}" in message and f"algo={other}" in message, message
        assert other in reader_of(key)
