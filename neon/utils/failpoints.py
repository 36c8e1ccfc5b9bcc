"""Failpoints: named places in daemon code where a test can inject a delay, a pause, an early
return, an error or a process exit (the `fail` crate as Neon's pageserver uses it).

This module owns the action grammar and a `Failpoints` registry. There is no process-wide state:
the daemon's root object owns one registry and hands it to the code that has failpoints; code
without one gets an empty registry (nothing ever fires).

An action string is one or more tasks joined by `->`; each task is
`[<pct>%][<count>*]<type>[(<arg>)]`, as in the fail crate:

* `off`: nothing.
* `return` / `return(<value>)`: `hit()` returns `""` / `"<value>"` to the caller, which decides
  what returning early means at that place.
* `sleep(<ms>)` (and the crate's busy-waiting `delay(<ms>)`): an `asyncio.sleep` of that long, to
  make a step slow (never used to synchronise anything).
* `pause`: block until the failpoint is configured again or removed; then go on with no action.
* `panic` / `panic(<msg>)`: raise `FailpointPanic`.
* `print` / `print(<msg>)`: log a line.
* `yield`: one pass through the event loop.
* `exit`: Neon's addition: the process exits at once with status 1 (Rust's `process::exit`; here
  `os._exit`, skipping all clean-up, like a crash at that point).

A task with a count fires that many times, then the next task in the chain is tried; with a
percentage it fires with that probability. When no task applies, nothing happens.

Configured from `FAILPOINTS=name=actions;name2=actions2` at start and over the management API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

__all__ = ["FailpointPanic", "Failpoints", "parse_actions"]

log = structlog.get_logger("failpoints")

_TYPES_WITH_ARG = {"return", "sleep", "panic", "print", "delay"}
_TYPES_WITHOUT_ARG = {"off", "pause", "yield", "exit"}
_ARG_REQUIRED = {"sleep", "delay"}


class FailpointPanic(RuntimeError):
    """A failpoint configured with `panic` was hit."""


@dataclass
class _Task:
    kind: str
    arg: str | None = None
    freq: float = 1.0
    remaining: int | None = None  # None: unlimited

    def take(self) -> bool:
        """Whether this task fires now (consuming one of its count)."""
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.freq < 1.0 and random.random() >= self.freq:
            return False
        if self.remaining is not None:
            self.remaining -= 1
        return True


def _parse_task(text: str) -> _Task:
    s = text.strip()
    if not s:
        raise ValueError("empty action")
    freq = 1.0
    remaining: int | None = None
    pct, sep, rest = s.partition("%")
    if sep:
        try:
            freq = float(pct) / 100.0
        except ValueError:
            raise ValueError(f"failed to parse frequency {pct!r} in action {text!r}") from None
        if not 0.0 <= freq <= 1.0:
            raise ValueError(f"frequency {pct}% in action {text!r} is not between 0% and 100%")
        s = rest
    cnt, sep, rest = s.partition("*")
    if sep:
        try:
            remaining = int(cnt)
        except ValueError:
            raise ValueError(f"failed to parse count {cnt!r} in action {text!r}") from None
        if remaining < 0:
            raise ValueError(f"negative count in action {text!r}")
        s = rest
    arg: str | None = None
    kind, paren, rest = s.partition("(")
    if paren:
        if not rest.endswith(")"):
            raise ValueError(f"parentheses do not match in action {text!r}")
        arg = rest[:-1]
    kind = kind.strip()
    if kind in _TYPES_WITHOUT_ARG:
        if arg is not None:
            raise ValueError(f"action {kind!r} takes no argument: {text!r}")
    elif kind in _TYPES_WITH_ARG:
        if arg is None and kind in _ARG_REQUIRED:
            raise ValueError(f"action {kind!r} needs a duration in milliseconds: {text!r}")
        if kind in _ARG_REQUIRED:
            try:
                if int(arg) < 0:  # type: ignore[arg-type]
                    raise ValueError
            except ValueError:
                raise ValueError(f"failed to parse timeout {arg!r} in action {text!r}") from None
    else:
        raise ValueError(f"unrecognized command {kind!r} in action {text!r}")
    return _Task(kind, arg, freq, remaining)


def parse_actions(actions: str) -> list[_Task]:
    """The tasks of an action string; `ValueError` saying what is wrong with it."""
    if not isinstance(actions, str):
        raise ValueError(f"actions must be a string, got {type(actions).__name__}")
    return [_parse_task(part) for part in actions.split("->")]


@dataclass
class _Failpoint:
    actions: str
    tasks: list[_Task]
    # Waiters of a `pause`: (their loop, the future that ends the pause).
    paused: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = field(default_factory=list)

    def release(self) -> None:
        for loop, fut in self.paused:
            loop.call_soon_threadsafe(_finish, fut)
        self.paused.clear()


def _finish(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Failpoints:
    """A registry of configured failpoints. `await hit(name)` at a failpoint runs its action."""

    def __init__(self) -> None:
        self._points: dict[str, _Failpoint] = {}
        self._lock = threading.Lock()  # configuration may come from another thread than the hits

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, var: str = "FAILPOINTS") -> Failpoints:
        """A registry configured from `FAILPOINTS` (`name=actions;name2=actions2`)."""
        fp = cls()
        spec = (os.environ if environ is None else environ).get(var)
        if spec:
            fp.configure_from_spec(spec)
        return fp

    def configure_from_spec(self, spec: str) -> None:
        """Apply `name=actions;name2=actions2`; nothing is applied if any part is bad."""
        parsed: list[tuple[str, str]] = []
        for i, item in enumerate(p for p in spec.split(";") if p.strip()):
            name, sep, actions = item.partition("=")
            if not sep:
                raise ValueError(f"startup failpoints: missing action on the {i + 1}th failpoint; try `{item}=return`")
            try:
                parse_actions(actions)
            except ValueError as e:
                raise ValueError(f"startup failpoints: failed to apply failpoint {item}: {e}") from None
            parsed.append((name.strip(), actions.strip()))
        for name, actions in parsed:
            self.configure(name, actions)

    def configure(self, name: str, actions: str) -> None:
        """Set the actions of `name` (replacing and releasing any pause on the old ones)."""
        if not name:
            raise ValueError("empty failpoint name")
        tasks = parse_actions(actions)
        with self._lock:
            old = self._points.pop(name, None)
            # `off` alone is the same as not configured: keep the hit path a failed dict lookup.
            if not all(t.kind == "off" for t in tasks):
                self._points[name] = _Failpoint(actions, tasks)
        if old is not None:
            old.release()
        log.info("cfg failpoint", name=name, actions=actions)

    def remove(self, name: str) -> None:
        with self._lock:
            old = self._points.pop(name, None)
        if old is not None:
            old.release()

    def clear(self) -> None:
        with self._lock:
            old = list(self._points.values())
            self._points.clear()
        for fp in old:
            fp.release()

    def configured(self) -> dict[str, str]:
        """The configured failpoints and their action strings."""
        return {name: fp.actions for name, fp in self._points.items()}

    def __bool__(self) -> bool:
        return bool(self._points)

    async def hit(self, name: str) -> str | None:
        """Run the action configured for `name`. Returns the value of a `return` action (`""` for
        a bare `return`), None otherwise; raises `FailpointPanic` for `panic`."""
        fp = self._points.get(name)
        if fp is None:
            return None
        with self._lock:
            task = next((t for t in fp.tasks if t.take()), None)
        if task is None:
            return None
        kind = task.kind
        if kind == "off":
            return None
        if kind == "return":
            log.info("failpoint returned", failpoint=name, value=task.arg)
            return task.arg if task.arg is not None else ""
        if kind in ("sleep", "delay"):
            log.info("failpoint sleeping", failpoint=name, ms=int(task.arg))  # type: ignore[arg-type]
            await asyncio.sleep(int(task.arg) / 1000.0)  # type: ignore[arg-type]
            log.info("failpoint sleep done", failpoint=name)
            return None
        if kind == "pause":
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            with self._lock:
                if self._points.get(name) is not fp:
                    return None  # reconfigured since the lookup: the pause is already over
                fp.paused.append((loop, fut))
            log.info("failpoint paused", failpoint=name)
            try:
                await fut
            finally:
                with self._lock, contextlib.suppress(ValueError):
                    fp.paused.remove((loop, fut))
            log.info("failpoint unpaused", failpoint=name)
            return None
        if kind == "panic":
            raise FailpointPanic(task.arg if task.arg is not None else f"failpoint {name} panic")
        if kind == "print":
            log.info(task.arg if task.arg is not None else f"failpoint {name} executed.")
            return None
        if kind == "yield":
            await asyncio.sleep(0)
            return None
        if kind == "exit":
            log.info("Exit requested by failpoint", failpoint=name)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        raise AssertionError(f"unhandled failpoint task {kind}")  # parse_actions admits no other kind
