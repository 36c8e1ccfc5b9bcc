"""Tenant configuration: humantime durations, defaults, overrides and the legacy `config` file."""

from __future__ import annotations

import contextlib
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from neon.pageserver.humantime import (
    DurationParseError,
    format_duration,
    format_duration_ns,
    parse_duration,
    parse_duration_ns,
)
from neon.pageserver.tenant_config import (
    TENANT_CONFIG_FILE_NAME,
    TENANT_CONFIG_HEADER,
    LayerAccessThreshold,
    NoEviction,
    TenantConf,
    TenantConfError,
    TenantConfOverrides,
    read_tenant_config,
    render_tenant_config,
    write_tenant_config,
)
from neon.utils.crashsafe import TEMP_SUFFIX

S = timedelta(seconds=1)

# --- humantime ---------------------------------------------------------------------------------

# (text, value, canonical form)
CANONICAL = [
    ("20s", 20 * S, "20s"),
    ("10m", 600 * S, "10m"),
    ("1h", 3600 * S, "1h"),
    ("7days", timedelta(days=7), "7days"),
    ("1day", timedelta(days=1), "1day"),
    ("1m 20s", 80 * S, "1m 20s"),
    ("23h", timedelta(hours=23), "23h"),
    ("1s 500ms", timedelta(seconds=1, milliseconds=500), "1s 500ms"),
    ("500ms", timedelta(milliseconds=500), "500ms"),
    ("0s", timedelta(0), "0s"),
    ("2h 37m", 9420 * S, "2h 37m"),
    ("1day 1h 1m 1s 1ms 1us", timedelta(days=1, hours=1, minutes=1, seconds=1, milliseconds=1, microseconds=1), None),
    ("1month", 2_630_016 * S, "1month"),
    ("1year", 31_557_600 * S, "1year"),
    ("2years", 2 * 31_557_600 * S, "2years"),
]

# Neon's default strings and other spellings humantime accepts.
SPELLINGS = [
    ("10 m", 600 * S),
    ("20 s", 20 * S),
    ("1 hr", 3600 * S),
    ("7 days", timedelta(days=7)),
    ("10 seconds", 10 * S),
    ("24 hour", timedelta(hours=24)),
    ("2h 15m", 8100 * S),
    ("1m20s", 80 * S),
    ("  5 min  ", 300 * S),
    ("3 weeks", timedelta(weeks=3)),
    ("1w", timedelta(weeks=1)),
    ("12M", 12 * 2_630_016 * S),
    ("17y", 17 * 31_557_600 * S),
    ("163µs", timedelta(microseconds=163)),
    ("31msec", timedelta(milliseconds=31)),
    ("31millis", timedelta(milliseconds=31)),
    ("3usec", timedelta(microseconds=3)),
    ("300secs", 300 * S),
    ("7hrs", timedelta(hours=7)),
    ("12mins", 720 * S),
    ("1 2s", 12 * S),  # humantime's quirk: whitespace inside a number is ignored
    ("0days", timedelta(0)),
]


@pytest.mark.parametrize(("text", "value", "canonical"), CANONICAL)
def test_humantime_canonical_table(text: str, value: timedelta, canonical: str | None) -> None:
    assert parse_duration(text) == value
    if canonical is not None:
        assert format_duration(value) == canonical
    assert parse_duration(format_duration(value)) == value


@pytest.mark.parametrize(("text", "value"), SPELLINGS)
def test_humantime_spellings(text: str, value: timedelta) -> None:
    assert parse_duration(text) == value


def test_humantime_nanoseconds() -> None:
    assert parse_duration_ns("20 min 17 nsec ") == 1200 * 10**9 + 17
    assert format_duration_ns(1200 * 10**9 + 17) == "20m 17ns"
    assert format_duration_ns(1_001_001_001) == "1s 1ms 1us 1ns"
    assert parse_duration_ns("33ns") == 33 and parse_duration_ns("17nanos") == 17
    with pytest.raises(DurationParseError, match="sub-microsecond"):
        parse_duration("1500ns")
    assert parse_duration("1000ns") == timedelta(microseconds=1)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "value was empty"),
        ("   ", "value was empty"),
        ("10", "time unit needed, for example 10sec or 10ms"),
        ("5 xyz", "unknown time unit 'xyz'"),
        ("1s 2", "time unit needed"),
        ("-1s", "expected number at 0"),
        ("s", "expected number at 0"),
        ("1h x", "expected number at 3"),
        ("1.5h", "invalid character at 1"),
        ("1h,2m", "invalid character at 2"),
        ("1 hour min", "expected number"),
        ("100000000000000000000s", "number is too large"),
        ("100000000000000ms", "number is too large"),
        ("1000000000000000M", "number is too large"),
    ],
)
def test_humantime_errors(text: str, reason: str) -> None:
    with pytest.raises(DurationParseError, match=f"invalid duration {text!r}: {reason}"):
        parse_duration_ns(text)


def test_humantime_rejects_negative_and_too_large() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_duration(timedelta(seconds=-1))
    with pytest.raises(DurationParseError, match="too large"):
        parse_duration("10000000000000000s")  # fits a Rust Duration, not a timedelta
    with pytest.raises(TypeError):
        parse_duration_ns(10)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=(1 << 64) * 10**9 - 1))
def test_humantime_ns_round_trip(ns: int) -> None:
    text = format_duration_ns(ns)
    assert parse_duration_ns(text) == ns
    assert format_duration_ns(parse_duration_ns(text)) == text


@given(st.timedeltas(min_value=timedelta(0)))
def test_humantime_timedelta_round_trip(td: timedelta) -> None:
    assert parse_duration(format_duration(td)) == td


@given(st.text(alphabet="0123456789 smhdwyMnuµi.,-x", max_size=20))
def test_humantime_fails_only_with_its_error(text: str) -> None:
    with contextlib.suppress(DurationParseError):
        parse_duration_ns(text)


# --- TenantConf ---------------------------------------------------------------------------------


def test_defaults_equal_spec() -> None:
    # pageserver spec §5.12, rendered in humantime canonical form.
    assert TenantConf().to_json_dict() == {
        "checkpoint_distance": 268435456,
        "checkpoint_timeout": "10m",
        "compaction_target_size": 134217728,
        "compaction_period": "20s",
        "compaction_threshold": 10,
        "gc_horizon": 67108864,
        "gc_period": "1h",
        "image_creation_threshold": 3,
        "pitr_interval": "7days",
        "walreceiver_connect_timeout": "10s",
        "lagging_wal_timeout": "10s",
        "max_lsn_wal_lag": 10485760,
        "trace_read_requests": False,
        "eviction_policy": {"kind": "NoEviction"},
        "min_resident_size_override": None,
        "evictions_low_residence_duration_metric_threshold": "1day",
        "gc_feedback": False,
    }
    d = TenantConf()
    assert d.checkpoint_timeout == timedelta(minutes=10) and d.pitr_interval == timedelta(days=7)
    assert d.eviction_policy == NoEviction()
    assert set(TenantConf.model_fields) == set(TenantConfOverrides.model_fields)


def test_json_round_trip_of_conf() -> None:
    conf = TenantConf(
        gc_period="30 s",
        pitr_interval=timedelta(hours=25),
        eviction_policy={"kind": "LayerAccessThreshold", "period": "10 minutes", "threshold": "24h"},
        min_resident_size_override=1 << 30,
    )
    j = conf.to_json_dict()
    assert j["gc_period"] == "30s" and j["pitr_interval"] == "1day 1h"
    assert j["eviction_policy"] == {"kind": "LayerAccessThreshold", "period": "10m", "threshold": "1day"}
    assert TenantConf.model_validate(j) == conf
    assert TenantConf.model_validate_json(conf.model_dump_json()) == conf


def test_unknown_key_is_named() -> None:
    with pytest.raises(ValidationError, match="gc_periodd"):
        TenantConfOverrides(gc_periodd="1h")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="bogus"):
        TenantConf.model_validate({"bogus": 1})
    with pytest.raises(TenantConfError, match=r"^invalid tenant config in API request: unknown key 'gc_periodd'$"):
        TenantConfOverrides.from_mapping({"gc_periodd": "1h"}, source="API request")
    with pytest.raises(TenantConfError, match=r"unknown key 'eviction_policy\.NoEviction\.period'"):
        TenantConfOverrides.from_mapping({"eviction_policy": {"kind": "NoEviction", "period": "1s"}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"checkpoint_distance": -1}, "checkpoint_distance: Input should be greater than or equal to 0"),
        ({"checkpoint_distance": 1 << 64}, "checkpoint_distance: Input should be less than or equal to"),
        ({"checkpoint_distance": "256"}, "checkpoint_distance: Input should be a valid integer"),
        ({"checkpoint_distance": True}, "checkpoint_distance: Input should be a valid integer"),
        ({"compaction_threshold": 1.5}, "compaction_threshold: Input should be a valid integer"),
        ({"max_lsn_wal_lag": 0}, "max_lsn_wal_lag: Input should be greater than or equal to 1"),
        ({"gc_period": "-1h"}, "gc_period: duration must not be negative"),
        ({"gc_period": "1 fortnight"}, "gc_period: invalid duration '1 fortnight': unknown time unit 'fortnight'"),
        ({"gc_period": 3600}, "gc_period: expected a duration string"),
        ({"pitr_interval": timedelta(seconds=-5)}, "pitr_interval: duration must not be negative"),
        ({"trace_read_requests": "yes"}, "trace_read_requests: Input should be a valid boolean"),
        ({"gc_feedback": 1}, "gc_feedback: Input should be a valid boolean"),
        ({"eviction_policy": {"kind": "Sometimes"}}, "eviction_policy: Input tag 'Sometimes'"),
        ({"eviction_policy": {"kind": "LayerAccessThreshold", "period": "1s"}}, "threshold: Field required"),
        ({"eviction_policy": "NoEviction"}, "eviction_policy:"),
    ],
)
def test_bad_values(data: dict[str, object], message: str) -> None:
    with pytest.raises(TenantConfError, match=message):
        TenantConfOverrides.from_mapping(data, source="test")
    with pytest.raises(ValidationError):
        TenantConf.model_validate(data)


def test_models_are_frozen() -> None:
    with pytest.raises(ValidationError):
        TenantConf().gc_horizon = 1  # type: ignore[misc]


def test_merge() -> None:
    defaults = TenantConf(gc_horizon=1000, min_resident_size_override=5)
    overrides = TenantConfOverrides(
        gc_period="0s",
        eviction_policy=LayerAccessThreshold(period="20m", threshold="1 day"),
        checkpoint_distance=4096,
    )
    eff = TenantConf.merged(defaults, overrides)
    assert eff == overrides.merge(defaults)
    assert eff.gc_period == timedelta(0) and eff.checkpoint_distance == 4096
    assert eff.eviction_policy == LayerAccessThreshold(period=timedelta(minutes=20), threshold=timedelta(days=1))
    # Unset keys inherit, including an Option-valued one (Neon: `self.x.or(global.x)`).
    assert eff.gc_horizon == 1000 and eff.min_resident_size_override == 5
    assert TenantConf.merged(defaults, TenantConfOverrides()) == defaults
    assert TenantConfOverrides().is_empty() and not overrides.is_empty()
    assert overrides.to_json_dict() == {
        "checkpoint_distance": 4096,
        "gc_period": "0s",
        "eviction_policy": {"kind": "LayerAccessThreshold", "period": "20m", "threshold": "1day"},
    }
    # JSON null means "not set".
    assert TenantConfOverrides.from_mapping({"gc_period": None}) == TenantConfOverrides()


# --- the legacy config file --------------------------------------------------------------------


def test_config_file_text(tmp_path: Path) -> None:
    overrides = TenantConfOverrides(
        gc_period="30s", trace_read_requests=True, eviction_policy={"kind": "NoEviction"}, pitr_interval="1m 20s"
    )
    write_tenant_config(tmp_path, overrides)
    text = (tmp_path / TENANT_CONFIG_FILE_NAME).read_text()
    assert text == (
        "# This file contains a specific per-tenant's config.\n"
        "#  It is read in case of pageserver restart.\n"
        "\n"
        "[tenant_config]\n"
        'gc_period = "30s"\n'
        'pitr_interval = "1m 20s"\n'
        "trace_read_requests = true\n"
        'eviction_policy = { kind = "NoEviction" }\n'
    )
    assert not list(tmp_path.glob("*" + TEMP_SUFFIX))
    assert read_tenant_config(tmp_path) == overrides


def test_empty_overrides_file(tmp_path: Path) -> None:
    write_tenant_config(tmp_path, TenantConfOverrides())
    assert (tmp_path / TENANT_CONFIG_FILE_NAME).read_text() == TENANT_CONFIG_HEADER
    assert read_tenant_config(tmp_path) == TenantConfOverrides()


def test_missing_file_is_no_overrides(tmp_path: Path) -> None:
    assert read_tenant_config(tmp_path) == TenantConfOverrides()


durations = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=100_000))
i64s = st.integers(min_value=0, max_value=(1 << 63) - 1)
overrides_strategy = st.builds(
    TenantConfOverrides,
    checkpoint_distance=st.none() | i64s,
    checkpoint_timeout=st.none() | durations,
    compaction_period=st.none() | durations,
    compaction_threshold=st.none() | i64s,
    max_lsn_wal_lag=st.none() | st.integers(min_value=1, max_value=(1 << 63) - 1),
    trace_read_requests=st.none() | st.booleans(),
    eviction_policy=st.none()
    | st.just(NoEviction())
    | st.builds(LayerAccessThreshold, period=durations, threshold=durations),
    min_resident_size_override=st.none() | i64s,
    evictions_low_residence_duration_metric_threshold=st.none() | durations,
    gc_feedback=st.none() | st.booleans(),
)


@given(overrides_strategy)
def test_config_text_round_trip(overrides: TenantConfOverrides) -> None:
    text = render_tenant_config(overrides)
    table = tomllib.loads(text)["tenant_config"]
    assert TenantConfOverrides.from_mapping(table) == overrides


def test_config_file_round_trip_on_disk(tmp_path: Path) -> None:
    overrides = TenantConfOverrides(
        checkpoint_distance=1 << 40,
        compaction_target_size=0,
        walreceiver_connect_timeout="2s",
        lagging_wal_timeout="500ms",
        max_lsn_wal_lag=1,
        eviction_policy={"kind": "LayerAccessThreshold", "period": "1h", "threshold": "7 days"},
        min_resident_size_override=0,
        evictions_low_residence_duration_metric_threshold="23h",
        gc_feedback=False,
    )
    write_tenant_config(tmp_path, overrides)
    assert read_tenant_config(tmp_path) == overrides
    # Rewriting replaces, never appends.
    write_tenant_config(tmp_path, TenantConfOverrides(gc_horizon=7))
    assert read_tenant_config(tmp_path) == TenantConfOverrides(gc_horizon=7)


def test_u64_beyond_toml_range_cannot_be_written(tmp_path: Path) -> None:
    with pytest.raises(TenantConfError, match="does not fit a TOML integer"):
        write_tenant_config(tmp_path, TenantConfOverrides(gc_horizon=1 << 63))
    assert not (tmp_path / TENANT_CONFIG_FILE_NAME).exists()


def test_reading_hand_written_spellings(tmp_path: Path) -> None:
    (tmp_path / "config").write_text('[tenant_config]\ngc_period = "1 hr"\npitr_interval = "7 days"\n')
    assert read_tenant_config(tmp_path) == TenantConfOverrides(gc_period="1h", pitr_interval="7days")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tenant_config\n", "is not valid TOML"),
        ("gc_period = 5\n", "unrecognized top-level key"),
        ("[tenant_config]\n[other]\n", "unrecognized top-level key\\(s\\): other"),
        ("tenant_config = 3\n", "'tenant_config' must be a table"),
        ("[tenant_config]\nnot_a_key = 1\n", "unknown key 'not_a_key'"),
        ('[tenant_config]\ngc_period = "soon"\n', "gc_period: invalid duration 'soon'"),
        ("[tenant_config]\ncheckpoint_distance = -5\n", "checkpoint_distance: Input should be greater"),
    ],
)
def test_bad_config_files_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / TENANT_CONFIG_FILE_NAME
    path.write_text(text)
    with pytest.raises(TenantConfError, match=message) as info:
        read_tenant_config(tmp_path)
    assert str(path) in str(info.value)


def test_non_utf8_config_file(tmp_path: Path) -> None:
    (tmp_path / TENANT_CONFIG_FILE_NAME).write_bytes(b"\xff\xfe")
    with pytest.raises(TenantConfError, match="not UTF-8"):
        read_tenant_config(tmp_path)
