"""Hydra config groups shipped with palaestra (model/, task/, algo/, experiment/)."""

from palaestra.config import register_schema

register_schema()  # the dataclasses' defaults, under the YAML files here (conf/config.yaml's first default)
