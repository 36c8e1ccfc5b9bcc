"""Generate the broker's protobuf/gRPC Python modules from `proto/broker.proto`.

    python -m neon.broker.build_proto [--force]

Output goes to `neon/broker/_generated/` (git-ignored): `broker_pb2.py`, `broker_pb2.pyi` and
`broker_pb2_grpc.py`. protoc emits `import broker_pb2` in the gRPC module, which only works with
the output directory on `sys.path`; it is rewritten to a package-relative import. Nothing is done
when every output is newer than the proto (and than this script), so running it on every set-up
and on every import of the broker modules (`ensure_generated`) is cheap. Files are generated into
a temporary directory and renamed into place, so a concurrent importer never sees half a module.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

_HERE = Path(__file__).resolve().parent
REPO_ROOT = _HERE.parent.parent
PROTO = REPO_ROOT / "proto" / "broker.proto"
OUT_DIR = _HERE / "_generated"
OUTPUTS = ("broker_pb2.py", "broker_pb2.pyi", "broker_pb2_grpc.py")

_INIT = '"""Generated from proto/broker.proto by neon.broker.build_proto; do not edit."""\n'


class ProtoBuildError(RuntimeError):
    pass


def is_stale() -> bool:
    """True if an output is missing or older than the proto or this generator."""
    newest_input = max(PROTO.stat().st_mtime, Path(__file__).stat().st_mtime)
    for name in (*OUTPUTS, "__init__.py"):
        out = OUT_DIR / name
        if not out.exists() or out.stat().st_mtime < newest_input:
            return True
    return False


def _fix_grpc_import(text: str) -> str:
    # `import broker_pb2 as broker__pb2` -> `from . import broker_pb2 as broker__pb2`
    fixed, n = re.subn(r"^import broker_pb2 as (\w+)$", r"from . import broker_pb2 as \1", text, flags=re.M)
    if n != 1:
        raise ProtoBuildError("unexpected protoc output: no `import broker_pb2` line in broker_pb2_grpc.py")
    return fixed


def build(force: bool = False) -> bool:
    """Regenerate if stale (or `force`); returns whether anything was written."""
    if not PROTO.exists():
        raise ProtoBuildError(f"{PROTO} not found (generation needs a source checkout)")
    if not force and not is_stale():
        return False
    # Imported here: only needed when regenerating, and it is a heavy import.
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/empty.proto lives here
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT_DIR, prefix=".build-") as tmp:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO.parent}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(PROTO),
            ]
        )
        if rc != 0:
            raise ProtoBuildError(f"protoc failed with exit code {rc} on {PROTO}")
        grpc_mod = Path(tmp) / "broker_pb2_grpc.py"
        grpc_mod.write_text(_fix_grpc_import(grpc_mod.read_text()))
        (Path(tmp) / "__init__.py").write_text(_INIT)
        # __init__ last: is_stale() checks it too, so an interrupted build is redone.
        for name in (*OUTPUTS, "__init__.py"):
            (Path(tmp) / name).replace(OUT_DIR / name)
    return True


def ensure_generated() -> None:
    """Called before importing `_generated`: a fresh checkout or an edited proto just works."""
    if PROTO.exists() and is_stale():
        build()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neon.broker.build_proto", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    try:
        wrote = build(force=args.force)
    except ProtoBuildError as e:
        print(f"build_proto: {e}", file=sys.stderr)
        return 1
    print(f"build_proto: {'generated' if wrote else 'up to date'} {OUT_DIR.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
