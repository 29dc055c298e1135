"""Policy versions: a registered model version plus its generation defaults and a lifecycle status.

Design (all in MLflow's own registry, no side database):

- A policy version belongs to a registered model NAME and is numbered 1, 2, 3, ... per NAME.
- Each one is a **registered-model tag** ``policy.<P>`` whose value is a small JSON record:
  ``{"model_version": "2", "temperature": 0.7, "max_new_tokens": 256, "status": "candidate",
  "created_at": ms, "updated_at": ms}``. A tag on the registered model rather than on the model
  version, because one model version can back several policies (the same weights served greedy
  and at temperature 0.7, say); a model-version tag could hold only one.
- **Aliases** make them addressable the MLflow way: ``policy-v<P>`` points at the policy's model
  version for good, and ``active`` points at the model version of the active policy, so
  ``models:/NAME@active`` loads what is in production.
- Status moves ``candidate -> active -> retired``; ``promote`` makes one policy active and retires
  the one that was (at most one is active: the old one is retired *before* the new one is marked,
  so a crash in between leaves none active rather than two); a retired policy can be promoted again
  (a rollback). ``promote`` refuses a policy whose model version failed the offline replay gate
  (model-version tag ``status=rejected``) unless ``force=True``.

The next number is one more than the largest in use; two processes creating policies for the
same model at the same instant could pick the same number (the registry has no transactions).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

from mlflow import MlflowClient

from palaestra.config.errors import ConfigError
from palaestra.registry.models import _check_model, open_client, resolve_version

__all__ = [
    "ACTIVE_ALIAS", "STATUSES", "PolicyVersion", "active_policy", "create_policy_version", "get_policy_version",
    "list_policy_versions", "policy_alias", "promote", "retire",
]

STATUSES = ("candidate", "active", "retired")
ACTIVE_ALIAS = "active"
_TAG_PREFIX = "policy."


@dataclass(frozen=True)
class PolicyVersion:
    """One policy version of a registered model."""

    name: str
    """Registered model name."""
    policy_version: int
    """Auto-incremented number, per registered model."""
    model_version: str
    """The MLflow model version it serves."""
    temperature: float
    """Default sampling temperature (0: greedy)."""
    max_new_tokens: int
    """Default generation budget."""
    status: str
    """candidate, active or retired."""
    created_at: int
    """Milliseconds since the epoch."""
    updated_at: int
    """Last status change, milliseconds since the epoch."""

    @property
    def alias(self) -> str:
        """The MLflow alias of this policy's model version: ``policy-v<P>``."""
        return policy_alias(self.policy_version)


def policy_alias(policy_version: int) -> str:
    """The alias naming policy version ``P``.

    >>> policy_alias(3)
    'policy-v3'
    """
    return f"policy-v{int(policy_version)}"


def _tag_key(policy_version: int) -> str:
    return f"{_TAG_PREFIX}{int(policy_version)}"


def _parse(name: str, key: str, value: str) -> PolicyVersion | None:
    number = key[len(_TAG_PREFIX) :]
    if not key.startswith(_TAG_PREFIX) or not number.isdigit():
        return None
    record = json.loads(value)
    return PolicyVersion(
        name=name, policy_version=int(number), model_version=str(record["model_version"]),
        temperature=float(record["temperature"]), max_new_tokens=int(record["max_new_tokens"]),
        status=record["status"], created_at=int(record["created_at"]), updated_at=int(record["updated_at"]),
    )


def _write(client: MlflowClient, policy: PolicyVersion) -> None:
    record = {"model_version": policy.model_version, "temperature": policy.temperature,
              "max_new_tokens": policy.max_new_tokens, "status": policy.status,
              "created_at": policy.created_at, "updated_at": policy.updated_at}
    client.set_registered_model_tag(policy.name, _tag_key(policy.policy_version), json.dumps(record))


def _policies(client: MlflowClient, name: str) -> list[PolicyVersion]:
    tags = _check_model(client, name).tags or {}
    found = (_parse(name, key, value) for key, value in tags.items())
    return sorted((p for p in found if p is not None), key=lambda p: p.policy_version)


def list_policy_versions(name: str, *, tracking_uri: str | None = None) -> list[PolicyVersion]:
    """Every policy version of registered model ``name``, by number."""
    return _policies(open_client(tracking_uri), name)


def get_policy_version(name: str, policy_version: int, *, tracking_uri: str | None = None) -> PolicyVersion:
    """Policy version ``policy_version`` of ``name``; a one-line error if there is none."""
    return _get(open_client(tracking_uri), name, policy_version)


def _get(client: MlflowClient, name: str, policy_version: int) -> PolicyVersion:
    policies = _policies(client, name)
    for policy in policies:
        if policy.policy_version == int(policy_version):
            return policy
    known = ", ".join(str(p.policy_version) for p in policies) or "none yet (palaestra policy create)"
    raise ConfigError(f"model {name!r} has no policy version {policy_version} (policy versions: {known})")


def active_policy(name: str, *, tracking_uri: str | None = None) -> PolicyVersion | None:
    """The active policy version of ``name``, or None if none is active."""
    active = [p for p in list_policy_versions(name, tracking_uri=tracking_uri) if p.status == "active"]
    return active[-1] if active else None


def create_policy_version(
    name: str, model_version: str | int, temperature: float = 0.7, max_new_tokens: int = 256,
    *, tracking_uri: str | None = None,
) -> int:
    """Add a policy version (status ``candidate``) serving ``model_version`` of ``name``; return its number."""
    if not temperature >= 0:
        raise ConfigError(f"temperature={temperature} must be >= 0")
    if int(max_new_tokens) <= 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be positive")
    client = open_client(tracking_uri)
    mv = resolve_version(client, name, model_version)
    number = max((p.policy_version for p in _policies(client, name)), default=0) + 1
    now = int(time.time() * 1000)
    policy = PolicyVersion(name, number, str(mv.version), float(temperature), int(max_new_tokens), "candidate", now, now)
    _write(client, policy)
    client.set_registered_model_alias(name, policy.alias, str(mv.version))
    return number


def promote(name: str, policy_version: int, *, force: bool = False, tracking_uri: str | None = None) -> PolicyVersion:
    """Make ``policy_version`` the active policy of ``name``; the previously active one is retired.

    Promoting the active policy again changes nothing. A policy whose model version was rejected
    by the offline replay gate is refused unless ``force``.
    """
    client = open_client(tracking_uri)
    policy = _get(client, name, policy_version)
    if policy.status == "active":
        return policy
    verdict = client.get_model_version(name, policy.model_version).tags.get("status")
    if verdict == "rejected" and not force:
        raise ConfigError(
            f"model version {policy.model_version} of {name!r} failed the replay gate (status=rejected); "
            "replay it again or promote with --force"
        )
    now = int(time.time() * 1000)
    for other in _policies(client, name):
        if other.status == "active":
            _write(client, _with_status(other, "retired", now))
    promoted = _with_status(policy, "active", now)
    _write(client, promoted)
    client.set_registered_model_alias(name, ACTIVE_ALIAS, policy.model_version)
    return promoted


def retire(name: str, policy_version: int, *, tracking_uri: str | None = None) -> PolicyVersion:
    """Retire ``policy_version``; if it was the active one, no policy is active afterwards."""
    client = open_client(tracking_uri)
    policy = _get(client, name, policy_version)
    if policy.status == "retired":
        return policy
    retired = _with_status(policy, "retired", int(time.time() * 1000))
    _write(client, retired)
    if policy.status == "active":
        client.delete_registered_model_alias(name, ACTIVE_ALIAS)
    return retired


def _with_status(policy: PolicyVersion, status: str, now: int) -> PolicyVersion:
    return dataclasses.replace(policy, status=status, updated_at=now)
