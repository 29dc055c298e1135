"""Hydra config groups shipped with palaestra (model/, task/, algo/, experiment/, ...)."""

from palaestra.jobs import register_schema

register_schema()  # the dataclasses' defaults, under the YAML files here (each algo/<method>.yaml's first default)
