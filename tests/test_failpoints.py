"""Failpoints (`neon.utils.failpoints`): the fail crate's action grammar and behaviour, the
pageserver's flush failpoints, `PUT /v1/failpoints`, and `FAILPOINTS` at daemon start."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from neon.pageserver.datadir_mapping import DatadirModification
from neon.pageserver.layers import try_parse_layer_file_name
from neon.pageserver.metadata import load_metadata
from neon.utils.failpoints import FailpointPanic, Failpoints, parse_actions
from tests.test_storage_units import make_timeline


# --- the grammar --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "actions",
    [
        "off",
        "return",
        "return(5000)",
        "return()",
        "sleep(10)",
        "delay(0)",
        "pause",
        "exit",
        "panic",
        "panic(boom)",
        "print(hello)",
        "yield",
        "1*return(x)->off",
        "50%return",
        "25%3*sleep(1)->return",
        " return(a) ",
    ],
)
def test_parse_valid(actions: str) -> None:
    assert parse_actions(actions)


@pytest.mark.parametrize(
    ("actions", "message"),
    [
        ("", "empty action"),
        ("bogus", "unrecognized command 'bogus'"),
        ("sleep", "needs a duration"),
        ("sleep(abc)", "failed to parse timeout"),
        ("sleep(-1)", "failed to parse timeout"),
        ("return(x", "parentheses do not match"),
        ("pause(1)", "takes no argument"),
        ("exit(1)", "takes no argument"),
        ("x*return", "failed to parse count"),
        ("150%return", "not between 0% and 100%"),
        ("abc%return", "failed to parse frequency"),
        ("return->", "empty action"),
    ],
)
def test_parse_invalid(actions: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("%", "%")):
        parse_actions(actions)
    # The registry refuses it too, and keeps what was configured before.
    fp = Failpoints()
    fp.configure("a", "return(1)")
    with pytest.raises(ValueError):
        fp.configure("a", actions)
    assert fp.configured() == {"a": "return(1)"}


# --- behaviour ----------------------------------------------------------------------------------
async def test_return_values_and_off() -> None:
    fp = Failpoints()
    assert not fp and await fp.hit("x") is None
    fp.configure("x", "return(5000)")
    fp.configure("y", "return")
    assert fp
    assert await fp.hit("x") == "5000"
    assert await fp.hit("x") == "5000"  # no count: every time
    assert await fp.hit("y") == ""  # a bare return: distinguishable from "nothing happened"
    assert await fp.hit("z") is None
    fp.configure("x", "off")
    assert await fp.hit("x") is None
    assert fp.configured() == {"y": "return"}
    fp.remove("y")
    assert not fp and await fp.hit("y") is None


async def test_counts_chain_to_the_next_task() -> None:
    fp = Failpoints()
    fp.configure("x", "2*return(a)->1*return(b)")
    assert [await fp.hit("x") for _ in range(4)] == ["a", "a", "b", None]
    fp.configure("x", "0%return")
    assert await fp.hit("x") is None
    fp.configure("x", "100%return(c)")
    assert await fp.hit("x") == "c"


async def test_sleep_is_asynchronous() -> None:
    """`sleep(ms)` delays the caller by that long without blocking the event loop."""
    fp = Failpoints()
    fp.configure("slow", "sleep(300)")
    loop = asyncio.get_running_loop()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = loop.create_task(ticker())
    start = loop.time()
    assert await fp.hit("slow") is None
    elapsed = loop.time() - start
    t.cancel()
    assert elapsed >= 0.29
    assert ticks >= 5  # the loop ran other tasks meanwhile


async def _until_paused(fp: Failpoints, name: str, task: asyncio.Task[Any]) -> None:
    # A poll with a bound: the task may first wait for a worker thread (a layer file write).
    for _ in range(1000):
        if fp._points.get(name) is not None and fp._points[name].paused:
            return
        assert not task.done(), task
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never paused")


@pytest.mark.parametrize("release", ["reconfigure", "off", "remove"])
async def test_pause_until_changed(release: str) -> None:
    fp = Failpoints()
    fp.configure("p", "pause")
    task = asyncio.get_running_loop().create_task(fp.hit("p"))
    await _until_paused(fp, "p", task)
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done()
    if release == "reconfigure":
        fp.configure("p", "return(1)")
    elif release == "off":
        fp.configure("p", "off")
    else:
        fp.remove("p")
    # A released pause goes on with no action (the new actions apply to later hits).
    assert await asyncio.wait_for(task, 5) is None
    if release == "reconfigure":
        assert await fp.hit("p") == "1"


async def test_pause_released_from_another_thread() -> None:
    fp = Failpoints()
    fp.configure("p", "pause")
    task = asyncio.get_running_loop().create_task(fp.hit("p"))
    await _until_paused(fp, "p", task)
    await asyncio.to_thread(fp.configure, "p", "off")
    assert await asyncio.wait_for(task, 5) is None


async def test_panic_raises() -> None:
    fp = Failpoints()
    fp.configure("x", "panic(it broke)")
    with pytest.raises(FailpointPanic, match="it broke"):
        await fp.hit("x")
    fp.configure("x", "panic")
    with pytest.raises(FailpointPanic, match="failpoint x panic"):
        await fp.hit("x")


def test_exit_ends_the_process_at_once(tmp_path: Path) -> None:
    """`exit`: status 1, and nothing after the failpoint runs (no `finally`, no atexit)."""
    script = tmp_path / "exit.py"
    script.write_text(
        "import asyncio, atexit\n"
        "from neon.utils.failpoints import Failpoints\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "async def main():\n"
        "    fp = Failpoints()\n"
        "    fp.configure('boom', 'exit')\n"
        "    print('before', flush=True)\n"
        "    try:\n"
        "        await fp.hit('boom')\n"
        "        print('after', flush=True)\n"
        "    finally:\n"
        "        print('finally ran', flush=True)\n"
        "asyncio.run(main())\n"
    )
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    assert res.returncode == 1, res
    lines = res.stdout.splitlines()
    assert "before" in lines, res.stdout
    assert not {"after", "finally ran", "atexit ran"} & set(lines), res.stdout


def test_from_env_spec() -> None:
    fp = Failpoints.from_env({"FAILPOINTS": "a=return(1);b=sleep(5) ; c=1*return->off"})
    assert fp.configured() == {"a": "return(1)", "b": "sleep(5)", "c": "1*return->off"}
    assert not Failpoints.from_env({})
    with pytest.raises(ValueError, match="missing action on the 2th failpoint"):
        Failpoints.from_env({"FAILPOINTS": "a=return;b"})
    # A bad part applies nothing.
    fp = Failpoints()
    with pytest.raises(ValueError, match="failed to apply failpoint b=nonsense"):
        fp.configure_from_spec("a=return;b=nonsense")
    assert not fp


# --- the pageserver's flush failpoints ----------------------------------------------------------
async def test_flush_pauses_after_the_layer_is_written_before_metadata(tmp_path: Path) -> None:
    """`flush-frozen-pausable` holds a flush with the delta layer written and serving reads but
    disk_consistent_lsn (in memory and in the metadata file) not yet advanced."""
    fp = Failpoints()
    fp.configure("flush-frozen-pausable", "pause")
    tl = make_timeline(tmp_path, failpoints=fp)
    tl.save_metadata()
    mod = DatadirModification(tl)
    mod.lsn = 0x100
    mod.init_empty()
    mod.put_relmap_file(1663, 5, b"m" * 512)
    mod.commit()
    flush = asyncio.get_running_loop().create_task(tl.freeze_and_flush())
    await _until_paused(fp, "flush-frozen-pausable", flush)
    assert [p for p in tmp_path.iterdir() if try_parse_layer_file_name(p.name) is not None]
    assert not tl.layers.frozen_layers and len(tl.layers.historic) == 1
    assert tl.disk_consistent_lsn == 0 and load_metadata(tmp_path).disk_consistent_lsn == 0
    fp.configure("flush-frozen-pausable", "off")
    await asyncio.wait_for(flush, 10)
    assert tl.disk_consistent_lsn == 0x100 and load_metadata(tmp_path).disk_consistent_lsn == 0x100
    await tl.shutdown(flush=False)


async def test_flush_return_is_ignored_and_sleep_delays(tmp_path: Path) -> None:
    """Only the configured failpoint acts: a `return` at the flush points changes nothing."""
    fp = Failpoints()
    fp.configure("flush-frozen-before-sync", "return")
    fp.configure("flush-frozen-exit", "return")
    fp.configure("flush-frozen-pausable", "sleep(200)")
    tl = make_timeline(tmp_path, failpoints=fp)
    tl.save_metadata()
    mod = DatadirModification(tl)
    mod.lsn = 0x100
    mod.init_empty()
    mod.commit()
    loop = asyncio.get_running_loop()
    start = loop.time()
    await tl.freeze_and_flush()
    assert loop.time() - start >= 0.19
    assert tl.disk_consistent_lsn == 0x100
    await tl.shutdown(flush=False)


async def test_ingest_backpressure_resumes_once_the_backlog_is_small(tmp_path: Path) -> None:
    """With four layers frozen behind a slow flush, ingest waits only until at most two are left,
    not for the whole backlog (regression: it used to wait for the flush loop to finish)."""
    fp = Failpoints()
    fp.configure("flush-frozen-pausable", "pause")
    tl = make_timeline(tmp_path, failpoints=fp)
    tl.save_metadata()
    for i in range(4):
        mod = DatadirModification(tl)
        mod.lsn = 0x100 * (i + 1)
        if i == 0:
            mod.init_empty()
        mod.put_relmap_file(1663, 5, bytes([i]) * 512)
        mod.commit()
        tl.advance_last_record_lsn(mod.lsn)
        tl.freeze()
    flush = tl._flush_task
    assert flush is not None
    await _until_paused(fp, "flush-frozen-pausable", flush)
    waiting = asyncio.get_running_loop().create_task(tl.ingest_backpressure(max_frozen=2))
    for _ in range(10):  # the chance to return early, which it must not take
        await asyncio.sleep(0)
    assert not waiting.done() and len(tl.layers.frozen_layers) == 3
    # Release the first layer, let the second through and hold the third: one is left frozen,
    # and ingest goes on while the flush is still held.
    fp.configure("flush-frozen-pausable", "1*off->pause")
    await asyncio.wait_for(waiting, 10)
    assert len(tl.layers.frozen_layers) <= 2 and not flush.done()
    fp.configure("flush-frozen-pausable", "off")
    await asyncio.wait_for(flush, 10)
    await tl.shutdown(flush=False)
