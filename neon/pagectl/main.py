"""Command line of `pagectl`."""

from __future__ import annotations

import argparse
import sys

from neon.pagectl import waldump


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagectl", description="Inspect WAL, layer files and metadata offline.")
    sub = parser.add_subparsers(dest="command", required=True)
    wd = sub.add_parser("waldump", help="print the records of WAL segment files")
    wd.add_argument("--json", action="store_true", help="one JSON object per record")
    wd.add_argument("files", nargs="+", help="consecutive WAL segment files")
    args = parser.parse_args(argv)
    if args.command == "waldump":
        return waldump.run(args.files, as_json=args.json)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
