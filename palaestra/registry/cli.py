"""``palaestra registry``, ``palaestra replay`` and ``palaestra policy``: plain argparse commands.

    palaestra registry [--name planner_model] [--tracking-uri URI]
    palaestra replay --model planner_model --version 2 --dataset datasets/planner/2026-11-22 [--baseline 1]
    palaestra policy create --model planner_model --version 2 [--temperature 0.7] [--max-new-tokens 256]
    palaestra policy promote|retire --model planner_model --policy-version 3
    palaestra policy list --model planner_model

The store is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``. User mistakes
raise ``ConfigError`` / ``FileNotFoundError``; ``palaestra.cli`` prints them in one line (exit 2).
``replay`` exits 0 when the gate passes and 1 when it fails.
"""

from __future__ import annotations

import argparse
import datetime
from contextlib import contextmanager

from mlflow.exceptions import MlflowException

from palaestra.config.errors import ConfigError

__all__ = ["policy_main", "registry_main", "replay_main"]


@contextmanager
def _mlflow_errors():
    """An MLflow refusal (a bad alias, an unreachable store) is a one-line user error, not a traceback."""
    try:
        yield
    except MlflowException as error:
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"MLflow: {message}") from None


def _uri_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")


def _time(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = [header, *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


# ---------------------------------------------------------------------------------------- registry
def registry_main(argv: list[str]) -> int:
    """Print every registered model version with its replay status and aliases."""
    parser = argparse.ArgumentParser(prog="palaestra registry", description="List registered models and versions.")
    parser.add_argument("--name", default=None, help="only this registered model")
    _uri_flag(parser)
    args = parser.parse_args(argv)
    from palaestra.registry.models import list_models, open_client

    with _mlflow_errors():
        client = open_client(args.tracking_uri)
        versions = list_models(client, args.name)
    if not versions:
        print(f"no registered models in {client.tracking_uri}")
        return 0
    rows = [[v.name, v.version, _time(v.created_at), v.status, v.tags.get("replay_dataset_version", "-"),
             ",".join(v.aliases) or "-", v.tags.get("dataset_version", "-"), v.run_id or "-"] for v in versions]
    print(_table(["model", "version", "created", "status", "replayed_on", "aliases", "trained_on", "run_id"], rows))
    return 0


# ------------------------------------------------------------------------------------------ replay
def replay_main(argv: list[str]) -> int:
    """Run the offline replay gate; exit code 0 on pass, 1 on fail."""
    parser = argparse.ArgumentParser(
        prog="palaestra replay",
        description="Replay a dated dataset's test split through a registered model version and gate it.")
    parser.add_argument("--model", required=True, help="registered model name (e.g. planner_model)")
    parser.add_argument("--version", required=True, help="model version number or alias")
    parser.add_argument("--dataset", required=True, help="dated dataset folder (e.g. datasets/planner/2026-11-22)")
    parser.add_argument("--baseline", default=None, help="baseline version or alias (default: hard constraints only)")
    parser.add_argument("--max-examples", type=int, default=0, help="replay only the first K test rows (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="generation budget per answer")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _uri_flag(parser)
    args = parser.parse_args(argv)
    from palaestra.registry.replay import replay

    with _mlflow_errors():
        result = replay(args.model, args.version, args.dataset, baseline=args.baseline, tracking_uri=args.tracking_uri,
                        max_examples=args.max_examples, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, device=args.device)
    print(_replay_report(result))
    return 0 if result.passed else 1


def _replay_report(result) -> str:
    if result.baseline is None:
        against = "no baseline (hard constraints only)"
    else:
        against = f"baseline v{result.baseline}" + (" (cached metrics)" if result.baseline_cached else "")
    lines = [f"\nreplay {result.name} v{result.version} on {result.data_name} {result.dataset_version} "
             f"({result.num_examples} example{'s' if result.num_examples != 1 else ''}), {against}"]
    base = result.baseline_metrics or {}
    header = f"{'metric':<24}{'candidate':>10}" + (f"{'baseline':>10}{'change':>10}" if base else "")
    lines.append(header)
    for key, value in result.candidate.items():
        line = f"{key:<24}{value:>10.3f}"
        if key in base:
            line += f"{base[key]:>10.3f}{value - base[key]:>+10.3f}"
        lines.append(line)
    if result.passed:
        lines.append(f"PASS: {result.name} v{result.version} tagged status=candidate (replay run {result.run_id})")
    else:
        lines.append(f"FAIL: {result.name} v{result.version} tagged status=rejected (replay run {result.run_id})")
        lines.extend(f"  - {reason}" for reason in result.reasons)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ policy
def policy_main(argv: list[str]) -> int:
    """Create, promote, retire and list policy versions."""
    parser = argparse.ArgumentParser(prog="palaestra policy", description="Policy versions of a registered model.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="create|promote|retire|list")
    create = actions.add_parser("create", help="a new policy version (status candidate) serving a model version")
    create.add_argument("--model", required=True, help="registered model name")
    create.add_argument("--version", required=True, help="model version number or alias")
    create.add_argument("--temperature", type=float, default=0.7, help="default sampling temperature (0: greedy)")
    create.add_argument("--max-new-tokens", type=int, default=256, help="default generation budget")
    for action, text in (("promote", "make a policy version active (the active one is retired)"),
                         ("retire", "retire a policy version")):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("--model", required=True, help="registered model name")
        sub.add_argument("--policy-version", type=int, required=True, help="policy version number")
        if action == "promote":
            sub.add_argument("--force", action="store_true", help="promote even if the replay gate rejected it")
    listing = actions.add_parser("list", help="every policy version of a model")
    listing.add_argument("--model", required=True, help="registered model name")
    for sub in (create, actions.choices["promote"], actions.choices["retire"], listing):
        _uri_flag(sub)
    args = parser.parse_args(argv)
    from palaestra.registry import policies

    uri = args.tracking_uri
    with _mlflow_errors():
        if args.action == "create":
            number = policies.create_policy_version(args.model, args.version, args.temperature, args.max_new_tokens,
                                                    tracking_uri=uri)
            policy = policies.get_policy_version(args.model, number, tracking_uri=uri)
            print(f"created policy version {number} of {args.model}: model version {policy.model_version}, "
                  f"temperature {policy.temperature}, max_new_tokens {policy.max_new_tokens}, status candidate "
                  f"(alias {policy.alias})")
        elif args.action == "promote":
            policy = policies.promote(args.model, args.policy_version, force=args.force, tracking_uri=uri)
            print(f"policy version {policy.policy_version} of {args.model} is active "
                  f"(alias {policies.ACTIVE_ALIAS} -> model version {policy.model_version})")
        elif args.action == "retire":
            policy = policies.retire(args.model, args.policy_version, tracking_uri=uri)
            print(f"policy version {policy.policy_version} of {args.model} is retired")
        else:
            listed = policies.list_policy_versions(args.model, tracking_uri=uri)
            if not listed:
                print(f"{args.model} has no policy versions yet (palaestra policy create --model {args.model} --version N)")
                return 0
            rows = [[str(p.policy_version), p.model_version, f"{p.temperature:g}", str(p.max_new_tokens), p.status,
                     p.alias, _time(p.updated_at)] for p in listed]
            print(_table(["policy", "model_version", "temperature", "max_new_tokens", "status", "alias", "updated"], rows))
    return 0
