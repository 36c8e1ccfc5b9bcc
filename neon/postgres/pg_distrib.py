"""Where the PG15 binaries are, and running them as the unprivileged Postgres user.

Postgres refuses to run as root. When we are root, every Postgres process (initdb, walredo,
compute) runs as `NEON_PG_USER` (default `neon`, created by `make setup`); otherwise as ourselves.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PG_MAJOR = 15
_REPO_ROOT = Path(__file__).resolve().parents[2]


class PgDistribError(RuntimeError):
    pass


@dataclass(frozen=True)
class PgDistrib:
    """A pg_distrib_dir: `<dir>/v15/{bin,lib,include}`."""

    root: Path
    major: int = PG_MAJOR

    @property
    def install_dir(self) -> Path:
        return self.root / f"v{self.major}"

    @property
    def bin_dir(self) -> Path:
        return self.install_dir / "bin"

    @property
    def lib_dir(self) -> Path:
        return self.install_dir / "lib"

    @property
    def include_server_dir(self) -> Path:
        return self.install_dir / "include" / "postgresql" / "server"

    def bin(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.exists():
            raise PgDistribError(f"{path} not found: is PostgreSQL {self.major} laid out (make setup)?")
        # The real path: the unprivileged user may not be able to traverse the checkout's
        # directories (a clone under /root), only the installation's.
        return path.resolve()

    @classmethod
    def default(cls) -> PgDistrib:
        """`$NEON_PG_DISTRIB_DIR`, else the repository's pg_install, else Debian's install."""
        env = os.environ.get("NEON_PG_DISTRIB_DIR")
        if env:
            return cls(Path(env))
        repo = _REPO_ROOT / "pg_install"
        if (repo / f"v{PG_MAJOR}" / "bin" / "postgres").exists():
            return cls(repo)
        debian = Path("/usr/lib/postgresql")
        if (debian / str(PG_MAJOR) / "bin" / "postgres").exists():
            return _DebianDistrib(debian)
        raise PgDistribError("PostgreSQL 15 not found: run 'make setup' or set NEON_PG_DISTRIB_DIR")


@dataclass(frozen=True)
class _DebianDistrib(PgDistrib):
    """Debian's own layout, /usr/lib/postgresql/15/{bin,lib}."""

    @property
    def install_dir(self) -> Path:
        return self.root / str(self.major)

    @property
    def include_server_dir(self) -> Path:
        return Path(f"/usr/include/postgresql/{self.major}/server")


@dataclass(frozen=True)
class PostgresUser:
    name: str
    uid: int
    gid: int

    @classmethod
    def resolve(cls) -> PostgresUser:
        """The account Postgres processes run as: ourselves, or NEON_PG_USER when we are root."""
        if os.geteuid() != 0:
            pw = pwd.getpwuid(os.geteuid())
            return cls(pw.pw_name, pw.pw_uid, pw.pw_gid)
        name = os.environ.get("NEON_PG_USER", "neon")
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise PgDistribError(
                f"running as root and the unprivileged user {name!r} does not exist: "
                "Postgres refuses to run as root; run 'make setup' or set NEON_PG_USER"
            ) from None
        if pw.pw_uid == 0:
            raise PgDistribError(f"NEON_PG_USER={name!r} is root; Postgres refuses to run as root")
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid)

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    def popen_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for subprocess/asyncio process creation to run as this user."""
        if self.is_self:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run as this user by `setpriv`, for process creation that takes no user/group
        arguments (uvloop's subprocess_exec refuses them). setpriv execs the command, so the pid is
        the command's own."""
        if self.is_self:
            return list(argv)
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        return [setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--", *argv]

    def own(self, path: str | os.PathLike[str], mode: int | None = None) -> None:
        """Give `path` to this user (no-op when it is ourselves)."""
        if not self.is_self:
            os.chown(path, self.uid, self.gid)
        if mode is not None:
            os.chmod(path, mode)

    def make_dir(self, path: str | os.PathLike[str], mode: int = 0o700) -> Path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        self.own(p, mode)
        return p

    def run(self, args: list[str | os.PathLike[str]], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a command as this user, capturing output; raises with its stderr on failure."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("cwd", "/")
        check = kwargs.pop("check", True)
        proc = subprocess.run([str(a) for a in args], **self.popen_kwargs(), **kwargs)
        if check and proc.returncode != 0:
            raise PgDistribError(
                f"{Path(str(args[0])).name} failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout or '').strip()}"
            )
        return proc


def initdb(
    distrib: PgDistrib,
    user: PostgresUser,
    datadir: str | os.PathLike[str],
    *,
    extra_args: list[str] | None = None,
    superuser: str = "cloud_admin",
) -> None:
    """Run initdb as `user` into a new directory `datadir` (its parent must exist); `superuser`
    is the cluster's bootstrap superuser (Neon's `initial_superuser_name`)."""
    target = Path(datadir)
    user.make_dir(target, 0o700)
    user.run(
        [
            distrib.bin("initdb"),
            "-D",
            target,
            "-U",
            superuser,
            "--no-instructions",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            *(extra_args or []),
        ],
        env={**os.environ, "LC_ALL": "C.UTF-8", "TZ": "UTC"},
    )
