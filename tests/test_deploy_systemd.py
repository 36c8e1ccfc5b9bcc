"""deploy/systemd: every unit passes `systemd-analyze verify` (with /opt/neon pointing at this
checkout), and each unit's ExecStart, run as written with the example configuration (paths and
ports moved into the test's directory), starts a daemon that becomes ready and stops cleanly on
the unit's KillSignal."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_pageserver_daemon import free_port

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "deploy" / "systemd"
TIMEOUT = 60.0


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    text = (UNITS / name).read_text().replace("\\\n", " ")  # continuation lines
    cp.read_string(text)
    return cp


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize(
    ("file", "as_name"),
    [
        ("neon-pageserver.service", "neon-pageserver.service"),
        ("neon-broker.service", "neon-broker.service"),
        ("neon-safekeeper@.service", "neon-safekeeper@1.service"),
    ],
)
def test_units_verify(tmp_path: Path, file: str, as_name: str) -> None:
    venv_bin = REPO / ".venv" / "bin"
    assert (venv_bin / "neon-pageserver").exists(), "the console scripts come from `make setup`"
    (tmp_path / file).write_text((UNITS / file).read_text().replace("/opt/neon", str(REPO)))
    run = subprocess.run(
        ["systemd-analyze", "verify", as_name], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_units_are_unprivileged_and_restart() -> None:
    for name in ("neon-pageserver.service", "neon-broker.service", "neon-safekeeper@.service"):
        svc = unit(name)["Service"]
        assert svc["User"] == "neon" and svc["Restart"] == "on-failure", name
        assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict", name


def exec_start(name: str, tmp: Path, env: dict[str, str], instance: str = "") -> list[str]:
    """The unit's ExecStart as argv: /opt/neon → this checkout, /var/lib/neon → tmp, %i, ${VAR}."""
    line = unit(name)["Service"]["ExecStart"]
    line = line.replace("/opt/neon", str(REPO)).replace("/var/lib/neon", str(tmp)).replace("%i", instance)
    for k, v in env.items():
        line = line.replace("${" + k + "}", v)
    assert "${" not in line, line
    return shlex.split(line)


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)  # polling a starting process: there is nothing to wait on
    raise TimeoutError(f"no answer on {port}{path}: {log.read_text()[-3000:]}")


def stop(name: str, proc: subprocess.Popen[bytes]) -> int:
    sig = getattr(signal, unit(name)["Service"]["KillSignal"])
    proc.send_signal(sig)
    return proc.wait(timeout=TIMEOUT)


def test_exec_start_lines_run_the_daemons_with_the_example_config(test_root: Path) -> None:
    pg_port, http_port, sk_pg, sk_http, broker_port, broker_http = (free_port() for _ in range(6))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # broker: its ExecStart with the ports moved
        argv = exec_start("neon-broker.service", test_root, {})
        argv = [a.replace("50051", str(broker_port)).replace("50052", str(broker_http)) for a in argv]
        blog = test_root / "broker.log"
        procs.append(subprocess.Popen(argv, stdout=open(blog, "ab"), stderr=subprocess.STDOUT))  # noqa: SIM115
        wait_http(broker_http, "/status", procs[-1], blog)

        # safekeeper 1: the example environment file with free ports
        env = dict(
            line.split("=", 1)
            for line in (UNITS / "safekeeper.env.example").read_text().splitlines()
            if line and not line.startswith("#")
        )
        env.update(
            LISTEN_PG=f"127.0.0.1:{sk_pg}",
            LISTEN_HTTP=f"127.0.0.1:{sk_http}",
            BROKER_ENDPOINT=f"http://127.0.0.1:{broker_port}",
        )
        (test_root / "safekeeper-1").mkdir()
        argv = exec_start("neon-safekeeper@.service", test_root, env, "1")
        slog = test_root / "safekeeper.log"
        procs.append(subprocess.Popen(argv, stdout=open(slog, "ab"), stderr=subprocess.STDOUT))  # noqa: SIM115
        wait_http(sk_http, "/v1/status", procs[-1], slog)

        # pageserver: the example pageserver.toml in its workdir
        workdir = test_root / "pageserver"
        workdir.mkdir()
        toml = (UNITS / "pageserver.toml.example").read_text()
        toml = toml.replace("127.0.0.1:64000", f"127.0.0.1:{pg_port}").replace(
            "127.0.0.1:9898", f"127.0.0.1:{http_port}"
        )
        toml = toml.replace("127.0.0.1:50051", f"127.0.0.1:{broker_port}").replace("/opt/neon", str(REPO))
        (workdir / "pageserver.toml").write_text(toml)
        (workdir / "tenants").mkdir()
        argv = exec_start("neon-pageserver.service", test_root, {})
        plog = test_root / "pageserver.log"
        procs.append(subprocess.Popen(argv, stdout=open(plog, "ab"), stderr=subprocess.STDOUT))  # noqa: SIM115
        wait_http(http_port, "/v1/status", procs[-1], plog)

        for name, proc in zip(
            ["neon-pageserver.service", "neon-safekeeper@.service", "neon-broker.service"], reversed(procs), strict=True
        ):
            assert stop(name, proc) == 0, name
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_examples_are_parsed_by_the_daemons(tmp_path: Path) -> None:
    """The example pageserver.toml is valid for `neon-pageserver` (pydantic validation)."""
    from neon.pageserver.config import load_config

    workdir = tmp_path / "ps"
    workdir.mkdir()
    shutil.copy(UNITS / "pageserver.toml.example", workdir / "pageserver.toml")
    conf = load_config(workdir, [])
    assert conf.id == 1 and conf.broker_endpoint == "http://127.0.0.1:50051"
    assert os.fspath(conf.pg_distrib_dir) == "/opt/neon/pg_install"
