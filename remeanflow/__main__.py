"""Command line: `python -m remeanflow provenance <artifact> [--verify] [--json]`, `python -m
remeanflow schema [--check]`."""

from __future__ import annotations

import argparse
import json
import sys

from . import config, provenance, settings


def _provenance(args) -> int:
    tree = provenance.lineage(args.artifact)
    if tree["rule"] is None:
        print(f"{args.artifact}: no provenance sidecar ({provenance.sidecar_path(args.artifact)})", file=sys.stderr)
        return 2
    changed = provenance.verify(args.artifact) if args.verify else None
    if args.json:
        print(json.dumps({"lineage": tree, "changed": changed}, indent=2))
    else:
        print(provenance.format_tree(tree))
        if changed is not None:
            if changed:
                print(f"\n{len(changed)} input(s) changed since they were recorded:")
                for c in changed:
                    print(f"  {c['path']}: recorded {c['recorded'][:12]}, now {c['now'][:12]}")
            else:
                print("\nall recorded inputs still on disk are unchanged")
    return 1 if changed else 0


def _schema(args) -> int:
    text = settings.schema_yaml()
    if args.check:
        if config.SCHEMA.read_text() != text:
            print(f"{config.SCHEMA} is out of date: run `python -m remeanflow schema`", file=sys.stderr)
            return 1
        return 0
    config.SCHEMA.write_text(text)
    print(f"wrote {config.SCHEMA}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="remeanflow")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("provenance", help="print the lineage of an artifact back to the dataset and teacher")
    p.add_argument("artifact")
    p.add_argument("--verify", action="store_true", help="re-hash inputs still on disk; exit 1 if any changed")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_provenance)
    p = sub.add_parser("schema", help="write schemas/config.schema.yaml from the settings classes")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from the settings classes")
    p.set_defaults(func=_schema)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
