"""Inspect and steer a model repository.

    python -m modelrepo list --repository models
    python -m modelrepo rollback --repository models --model merged_model [--version 2]
    python -m modelrepo promote --repository models --model merged_model   (a version published staged)
    python -m modelrepo remove --repository models --model sql_adapter
    python -m modelrepo verify --repository models [--model merged_model]
    python -m modelrepo list --repository s3://bucket/models   (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ..., AWS_PROFILE)
"""

from __future__ import annotations

import argparse
import sys

from modelrepo import RepositoryError, open_store, promote, remove_entry, rollback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelrepo", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["list", "rollback", "promote", "remove", "verify"])
    parser.add_argument("--repository", required=True, help="a folder, or s3://bucket/prefix")
    parser.add_argument("--model", help="the served name (rollback, promote, remove, verify)")
    parser.add_argument("--version", type=int, help="rollback target (default: the previous version)")
    args = parser.parse_args(argv)
    try:
        if args.command in ("rollback", "promote", "remove") and not args.model:
            parser.error(f"{args.command} needs --model")
        store = open_store(args.repository)
        if args.command == "rollback":
            e = rollback(store, args.model, args.version)
            print(f"{e.name} now serves version {e.version}")
        elif args.command == "promote":
            e = promote(store, args.model)
            print(f"{e.name} now serves version {e.version}")
        elif args.command == "remove":
            remove_entry(store, args.model)
            print(f"{args.model} is no longer served")
        else:
            index = store.snapshot().index
            bad = 0
            # list: one line a name (a name only staged, by a first publish, too); verify: live and staged versions
            by_name = list({**index.staged, **index.entries}.values())
            for e in by_name if args.command == "list" else index.named():
                if args.model and e.name != args.model:
                    continue
                if args.command == "list":
                    extra = f" on {e.base} (alpha {e.alpha:g})" if e.kind == "adapter" else ""
                    kept = store.versions(e.name)
                    live = f"live {index.entries[e.name].version}" if e.name in index.entries else "not live"
                    staged = f"\tstaged {index.staged[e.name].version}" if e.name in index.staged else ""
                    print(f"{e.name}\t{e.kind}{extra}\t{live}{staged}\tkept {kept}\t{e.published_at}")
                else:
                    problems = store.verify_version(e.path)
                    bad += bool(problems)
                    print(f"{e.path}: {'ok' if not problems else '; '.join(problems)}")
            return 1 if bad else 0
    except RepositoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
