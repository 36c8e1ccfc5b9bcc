"""`neon-broker`: the storage broker daemon (spec control-plane Part 3.4, safekeeper-and-broker §5).

    neon-broker [-l 127.0.0.1:50051] [--listen-http HOST:PORT] [--timeline-chan-size 32]
                [--all-keys-chan-size 16384] [--http2-keepalive-interval '5000 ms']
                [--log-format plain|json]

Flags are Neon's `storage_broker` flags, plus `--listen-http`: our HTTP `/metrics` and `/status`
live on their own port (see `neon.broker.server`). Runs on uvloop (grpc.aio works on it). SIGTERM,
SIGINT or SIGQUIT: cancel every stream, close the listeners, exit 0 — the broker keeps no state
to save, so, as Neon's, it stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import structlog

from neon.utils.logging import setup_logging

from .server import (
    DEFAULT_ALL_KEYS_CHAN_SIZE,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_LISTEN_ADDR,
    DEFAULT_TIMELINE_CHAN_SIZE,
    Broker,
)

log = structlog.get_logger("storage_broker")

_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0}


def parse_duration(text: str) -> float:
    """Neon-style (humantime) durations as used by this flag: `5000 ms`, `5s`, `1 min`; seconds."""
    t = text.strip().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num) :] or "s"
    if unit not in _UNITS or not num:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected e.g. '5000 ms' or '5s'")
    try:
        value = float(num) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be positive")
    return value


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


async def serve(args: argparse.Namespace) -> None:
    broker = Broker(
        args.listen_addr,
        listen_http=args.listen_http,
        timeline_chan_size=args.timeline_chan_size,
        all_keys_chan_size=args.all_keys_chan_size,
        keepalive_interval=args.http2_keepalive_interval,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, on_signal, sig)
    await broker.start()
    try:
        log.info("listening", listen_addr=args.listen_addr, port=broker.port, listen_http=args.listen_http)
        await stop.wait()
        log.info("received signal, terminating", signal=received[0] if received else None)
    finally:
        await broker.stop()
        log.info("storage broker stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neon-broker", description="Broker for Neon storage nodes communication.")
    parser.add_argument("-l", "--listen-addr", default=DEFAULT_LISTEN_ADDR, help="gRPC listen address, host:port")
    parser.add_argument(
        "--listen-http", default=None, metavar="HOST:PORT", help="serve HTTP /metrics and /status here (optional)"
    )
    parser.add_argument("--timeline-chan-size", type=_positive_int, default=DEFAULT_TIMELINE_CHAN_SIZE)
    parser.add_argument("--all-keys-chan-size", type=_positive_int, default=DEFAULT_ALL_KEYS_CHAN_SIZE)
    parser.add_argument(
        "--http2-keepalive-interval",
        type=parse_duration,
        default=DEFAULT_KEEPALIVE_INTERVAL,
        help="server HTTP/2 keepalive ping interval (default '5000 ms')",
    )
    parser.add_argument("--log-format", choices=("plain", "json"), default="plain")
    args = parser.parse_args(argv)
    setup_logging("console" if args.log_format == "plain" else "json")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency, but the daemon runs without it
        pass
    try:
        asyncio.run(serve(args))
    except (OSError, ValueError) as e:  # bind failure, malformed address
        log.error("storage broker failed to start", error=str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
