"""pageserver.toml: Neon's keys and defaults, `-c` overrides, `--init`, and the errors for bad input."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from neon.pageserver.config import (
    IGNORED_KEYS,
    AuthType,
    PageServerConf,
    PageServerConfError,
    init_workdir,
    load_config,
)
from neon.pageserver.tenant_config import TenantConf


def write(workdir: Path, text: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "pageserver.toml").write_text(text)
    return workdir


def test_defaults_are_neons() -> None:
    c = PageServerConf(id=7)
    assert c.listen_pg_addr == "127.0.0.1:64000" and c.listen_http_addr == "127.0.0.1:9898"
    assert c.wait_lsn_timeout == c.wal_redo_timeout == timedelta(seconds=60)
    assert c.initial_superuser_name == "cloud_admin" and c.page_cache_size == 8192
    assert c.max_file_descriptors == 100 and c.broker_endpoint == "http://127.0.0.1:50051"
    assert c.pg_auth_type is c.http_auth_type is AuthType.Trust and c.log_format == "plain"
    assert c.background_task_maximum_delay == timedelta(seconds=10)
    assert c.remote_storage is None and c.tenant_config.is_empty()
    assert c.default_tenant_conf() == TenantConf()
    assert set(IGNORED_KEYS) <= set(PageServerConf.model_fields)


def test_load_file_with_humantime_and_tenant_config(tmp_path: Path) -> None:
    wd = write(
        tmp_path,
        """
id = 10
listen_pg_addr = '0.0.0.0:6400'
wait_lsn_timeout = '5 s'
wal_redo_timeout = '1 min'
pg_distrib_dir = 'pg_install'
remote_storage = { local_path = '/tmp/remote' }

[tenant_config]
checkpoint_distance = 1048576
gc_period = '30 s'
eviction_policy = { kind = 'LayerAccessThreshold', period = '10m', threshold = '1h' }
""",
    )
    c = load_config(wd)
    assert c.id == 10 and c.listen_pg_addr == "0.0.0.0:6400"
    assert c.wait_lsn_timeout == timedelta(seconds=5) and c.wal_redo_timeout == timedelta(minutes=1)
    assert c.pg_distrib_dir == tmp_path / "pg_install"  # relative to the workdir, as in Neon
    assert c.remote_storage == {"local_path": "/tmp/remote"}
    eff = c.default_tenant_conf()
    assert eff.checkpoint_distance == 1 << 20 and eff.gc_period == timedelta(seconds=30)
    assert eff.compaction_threshold == 10
    assert c.ignored_keys_set() == ["remote_storage"]


def test_overrides_merge_over_the_file(tmp_path: Path) -> None:
    wd = write(tmp_path, "id = 1\npage_cache_size = 100\n[tenant_config]\ngc_horizon = 5\n")
    c = load_config(
        wd,
        [
            "page_cache_size = 200",
            "listen_http_addr='127.0.0.1:1234'",
            "tenant_config.gc_period = '2h'",
            "remote_storage={local_path='/x'}",
        ],
    )
    assert c.page_cache_size == 200 and c.listen_http_addr == "127.0.0.1:1234"
    # A dotted tenant_config key adds to the file's table rather than replacing it.
    assert c.tenant_config.gc_horizon == 5 and c.tenant_config.gc_period == timedelta(hours=2)
    assert c.remote_storage == {"local_path": "/x"}
    # The last override of a key wins.
    assert load_config(wd, ["id=2", "id=3"]).id == 3


@pytest.mark.parametrize(
    ("text", "overrides", "match"),
    [
        ("id = 1\nlisten_pg_adr = 'x:1'\n", [], "unrecognized pageserver option 'listen_pg_adr'"),
        ("id = 1\n", ["bogus_key = 1"], "unrecognized pageserver option 'bogus_key'"),
        ("listen_pg_addr = '127.0.0.1:1'\n", [], "missing required option 'id'"),
        ("id = 1\nwait_lsn_timeout = 'soon'\n", [], "wait_lsn_timeout"),
        ("id = 1\nwait_lsn_timeout = 60\n", [], "wait_lsn_timeout"),
        ("id = 1\npage_cache_size = -1\n", [], "page_cache_size"),
        ("id = 1\npg_auth_type = 'Password'\n", [], "pg_auth_type"),
        ("id = 1\nlog_format = 'xml'\n", [], "log_format"),
        ("id = 1\nlisten_http_addr = 'nohost'\n", [], "listen_http_addr"),
        ("id = 1\n[tenant_config]\ncheckpoint_distanse = 1\n", [], "checkpoint_distanse"),
        ("id = 1\nremote_storage = { local_path = '/a', bucket_name = 'b' }\n", [], "exactly one"),
        ("id = 1\nthis is not toml\n", [], "not valid TOML"),
        ("id = 1\n", ["listen_pg_addr=0.0.0.0:6400"], "strings must be quoted"),
        ("id = 1\n", ["workdir='/x'"], "-D"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, overrides: list[str], match: str) -> None:
    wd = write(tmp_path, text)
    with pytest.raises(PageServerConfError, match=match):
        load_config(wd, overrides)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PageServerConfError, match="--init"):
        load_config(tmp_path)


def test_neon_jwt_accepted_but_refused_at_start(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, "id = 1\nhttp_auth_type = 'NeonJWT'\n"))
    assert c.auth_key_path(tmp_path) == tmp_path / "auth_public_key.pem"
    with pytest.raises(PageServerConfError, match="not supported"):
        c.refuse_unsupported()
    PageServerConf(id=1).refuse_unsupported()


def test_init_writes_effective_config_and_refuses_twice(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    conf = init_workdir(wd, ["id=5", "listen_pg_addr='127.0.0.1:15000'", "tenant_config.gc_period='1h 30m'"])
    assert (wd / "tenants").is_dir()
    text = (wd / "pageserver.toml").read_text()
    assert "id = 5" in text and "page_cache_size = 8192" in text and "[tenant_config]" in text
    assert load_config(wd) == conf
    assert conf.tenant_config.gc_period == timedelta(hours=1, minutes=30)
    with pytest.raises(PageServerConfError, match="already"):
        init_workdir(wd, ["id=5"])
    with pytest.raises(PageServerConfError, match="'id'"):
        init_workdir(tmp_path / "other", [])
    assert not (tmp_path / "other" / "pageserver.toml").exists()
