"""Command line: `python -m remeanflow provenance <artifact> [--verify] [--json]`, `python -m
remeanflow schema [--check]`, `python -m remeanflow rehearsal-assets [--preset P] [--out DIR]`.

`provenance` prints the artifact's lineage; with `--verify` it re-hashes the artifact itself and
every input of the whole lineage (each once; also the other outputs of each job in it, against
their own sidecars) against the hashes the sidecars recorded, and lists each one that changed or
is missing: path, recorded hash, hash now (or missing) and which artifacts recorded it. `--json`
prints {"lineage", "verified", "problems"}, each problem with a `kind` ("changed" or "missing"),
`path`, `recorded`, `current` (null if missing), `recorded_by` and `same_job_as` (null, or the
lineage node whose job also wrote this output).

Exit codes of `provenance`: 0 = everything verified (or lineage printed without `--verify`);
1 = something changed or is missing (or a sidecar in the lineage is unreadable); 2 = the artifact
has no provenance sidecar, or a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import config, generate, plan, provenance, settings, status

PROVENANCE_EXIT_CODES = """exit codes: 0 = everything verified (or lineage printed without --verify);
1 = something changed or is missing (each listed), or a sidecar in the lineage is unreadable;
2 = the artifact has no provenance sidecar, or a usage error"""


def _provenance(args) -> int:
    if not provenance.sidecar_path(args.artifact).is_file():
        print(f"{args.artifact}: no provenance sidecar ({provenance.sidecar_path(args.artifact)})", file=sys.stderr)
        return 2
    hashes: dict = {}  # shared, so that lineage and verify hash each source once
    try:
        tree = provenance.lineage(args.artifact, hashes=hashes)
        problems = provenance.verify(args.artifact, hashes=hashes) if args.verify else None
    except ValueError as e:  # a sidecar in the lineage that is no longer JSON: it changed
        print(e, file=sys.stderr)
        return 1
    if args.json:
        verified = None if problems is None else not problems
        print(json.dumps({"lineage": tree, "verified": verified, "problems": problems}, indent=2))
    else:
        print(provenance.format_tree(tree))
        if problems:
            print(f"\nverify FAILED: {len(problems)} changed or missing since recorded:")
            print(provenance.format_problems(problems))
        elif problems is not None:
            print("\nverified: the artifact and every input of its lineage are unchanged")
    return 1 if problems else 0


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


def _rehearsal_assets(args) -> int:
    from . import rehearsal  # torch, diffusers: only for this command

    rehearsal.write_assets(args.preset, args.out)
    print(f"wrote {args.out}/assets.yaml; run: snakemake --profile profiles/local --configfile {args.preset} "
          f"{args.out}/assets.yaml")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="remeanflow")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("provenance", help="print the lineage of an artifact back to the dataset and teacher",
                       description="Print the lineage of an artifact back to the dataset and teacher; with "
                                   "--verify, check it against the recorded hashes.",
                       epilog=PROVENANCE_EXIT_CODES)
    p.add_argument("artifact")
    p.add_argument("--verify", action="store_true",
                   help="re-hash the artifact and every input of its lineage; list each changed or missing one")
    p.add_argument("--json", action="store_true",
                   help='machine-readable output; with --verify, "problems" lists each with its "kind"')
    p.set_defaults(func=_provenance)
    p = sub.add_parser("schema", help="write schemas/config.schema.yaml from the settings classes")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from the settings classes")
    p.set_defaults(func=_schema)
    p = sub.add_parser("rehearsal-assets", help="write the local assets of a rehearsal preset and their config overlay",
                       description="Write what a rehearsal preset fetches (train tar, EDM2 pickles, Inception "
                                   "weights, VAE; random weights) into OUT and the config overlay OUT/assets.yaml.")
    p.add_argument("--preset", default="presets/rehearsal512.yaml", help="rehearsal preset (default: %(default)s)")
    p.add_argument("--out", default="results/rehearsal-assets", help="asset folder (default: %(default)s)")
    p.set_defaults(func=_rehearsal_assets)
    status.add_parser(sub)
    plan.add_parser(sub)
    generate.add_sample_parser(sub)
    generate.add_export_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
