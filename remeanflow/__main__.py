"""Command line: `python -m remeanflow provenance <artifact> [--verify] [--json]`."""

from __future__ import annotations

import argparse
import json
import sys

from . import provenance


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="remeanflow")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("provenance", help="print the lineage of an artifact back to the dataset and teacher")
    p.add_argument("artifact")
    p.add_argument("--verify", action="store_true", help="re-hash inputs still on disk; exit 1 if any changed")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_provenance)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
