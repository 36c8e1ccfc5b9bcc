"""The README's quick start, run as written: `scripts/run.sh` (what `make run` runs after set-up)
brings the system up, then every `$ ` line of the README's session runs in a shell, with the
README's ports replaced by free ones; the outputs show the branch semantics the README promises.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.test_pageserver_daemon import free_port

REPO = Path(__file__).resolve().parents[1]


def readme_session() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("A session, as in Neon's README:", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line[2:].split("  #")[0].strip() for line in block.splitlines() if line.startswith("$ ")]


@pytest.mark.slow
def test_readme_session(test_root: Path) -> None:
    ports = {
        name: free_port() for name in ("broker", "ps_pg", "ps_http", *(f"sk{i}{k}" for i in (1, 2, 3) for k in "ph"))
    }
    config = test_root / "neon_local.toml"
    text = (REPO / "deploy" / "neon_local.toml").read_text()
    for old, new in [
        ("50051", ports["broker"]),
        ("64000", ports["ps_pg"]),
        ("9898", ports["ps_http"]),
        ("5454", ports["sk1p"]),
        ("7676", ports["sk1h"]),
        ("5455", ports["sk2p"]),
        ("7677", ports["sk2h"]),
        ("5456", ports["sk3p"]),
        ("7678", ports["sk3h"]),
    ]:
        text = text.replace(old, str(new))
    config.write_text(text)
    env = {**os.environ, "NEON_REPO_DIR": str(test_root / ".neon"), "NEON_LOCAL_CONFIG": str(config)}
    neon_local = [str(REPO / ".venv" / "bin" / "python"), "-m", "neon.control_plane"]

    def make_run() -> subprocess.CompletedProcess[str]:
        argv = ["bash", "scripts/run.sh"]
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    try:
        up = make_run()
        assert up.returncode == 0, up.stdout + up.stderr
        main_port = int(re.search(r"ready: psql -h 127\.0\.0\.1 -p (\d+)", up.stdout).group(1))  # type: ignore[union-attr]
        again = subprocess.run(
            ["bash", "scripts/run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert again.returncode == 0 and f"-p {main_port} " in again.stdout, again.stdout + again.stderr
        outputs = []
        for line in readme_session():
            cmd = line.replace(".venv/bin/neon_local", " ".join(neon_local)).replace("-p 55432", f"-p {main_port}")
            if "-p 55434" in cmd:
                listing = subprocess.run([*neon_local, "endpoint", "list"], env=env, capture_output=True, text=True)
                branch_port = re.search(r"^ migration_check\s+127\.0\.0\.1:(\d+)", listing.stdout, re.M).group(1)  # type: ignore[union-attr]
                cmd = cmd.replace("-p 55434", f"-p {branch_port}")
            run = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, f"{line}\n{run.stdout}{run.stderr}"
            outputs.append(run.stdout)
        # The README's claims: the listing shows both endpoints running ...
        listing = next(o for line, o in zip(readme_session(), outputs, strict=True) if "endpoint list" in line)
        assert re.search(r"^ main\s+127\.0\.0\.1:\d+\s+[0-9a-f]{32}\s+main\s+\S+\s+running", listing, re.M), listing
        assert re.search(r"^ migration_check\s+.*running", listing, re.M), listing
        # ... the branch sees main's row, and main does not see the branch's.
        selects = [o for line, o in zip(readme_session(), outputs, strict=True) if "SELECT * FROM t" in line]
        assert "main" in selects[0] and "branch" not in selects[0], selects[0]
        assert "main" in selects[1] and "branch" not in selects[1], selects[1]
    finally:
        subprocess.run([*neon_local, "stop"], env=env, capture_output=True, timeout=120)
