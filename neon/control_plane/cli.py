"""The `neon_local` command tree (spec control-plane §1.2-§1.4): argparse parsers and one handler
per command, printing Neon's console lines.

Every command but `init` loads `<repo>/config` first and writes it back only when it changed (a
new branch mapping or default tenant). An operator error is one line on stderr,
`command failed: <reason>`, and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from neon.compute import EndpointError
from neon.postgres.pg_distrib import PgDistrib, PgDistribError
from neon.utils.lsn import Lsn

from .config import DEFAULT_BRANCH_NAME, DEFAULT_PG_VERSION, ConfigError, LocalEnv, default_init_config, repo_dir
from .endpoints import ComputeControlPlane, EndpointConf
from .pageserver_api import ApiError, PageserverClient, parse_tenant_settings, tenant_state_text
from .processes import ProcessError
from .services import (
    init_pageserver,
    start_broker,
    start_pageserver,
    start_safekeeper,
    stop_broker,
    stop_pageserver,
    stop_safekeeper,
)

SUPPORTED_PG_VERSIONS = (15,)


class CommandError(Exception):
    """An operator error with a one-line explanation."""


# --- argument types --------------------------------------------------------------------------------
def _hex_id(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{32}", text):
        raise argparse.ArgumentTypeError(f"invalid id {text!r}: expected 32 hexadecimal characters")
    return text.lower()


def _lsn(text: str) -> str:
    try:
        return str(Lsn.parse(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid LSN {text!r}: expected X/Y in hexadecimal") from None


def _bool(text: str) -> bool:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}: expected true or false")


def _new_id() -> str:
    return os.urandom(16).hex()


def _check_pg_version(version: int) -> None:
    if version not in SUPPORTED_PG_VERSIONS:
        raise CommandError(f"PostgreSQL v{version} is not supported: only v15 is available")


# --- init / start / stop ---------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> None:
    base = repo_dir()
    text = Path(args.config).read_text() if args.config else default_init_config()
    env = LocalEnv.parse_toml(text, base, source=args.config or "the built-in default config")
    if not env.pageservers:
        raise CommandError("the config needs at least one [[pageservers]] entry")
    _check_pg_version(args.pg_version)
    if env.pg_distrib_dir is None:
        env_dir = os.environ.get("POSTGRES_DISTRIB_DIR")
        env.pg_distrib_dir = Path(env_dir) if env_dir else PgDistrib.default().root
    postgres = env.pg_distrib_dir / f"v{args.pg_version}" / "bin" / "postgres"
    if not postgres.exists():
        raise CommandError(f"Can't find postgres binary at {postgres}")
    if env.neon_distrib_dir is None:
        env.neon_distrib_dir = Path(sys.executable).parent
    env.private_key_path = Path("auth_private_key.pem")

    if base.exists():
        if not args.force:
            raise CommandError(
                f"directory '{base}' already exists. Perhaps already initialized? "
                "(Hint: use --force to remove all contents)"
            )
        print(f"removing all contents of '{base}'")
        _empty_dir(base)
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)  # the unprivileged Postgres user reaches endpoints below it
    try:
        _generate_auth_keys(base)
        env.endpoints_dir.mkdir(exist_ok=True)
        env.endpoints_dir.chmod(0o755)
        for sk in env.safekeepers:
            env.safekeeper_dir(sk.id).mkdir(parents=True, exist_ok=True)
        env.save()
        for ps in env.pageservers:
            init_pageserver(env, ps, args.pageserver_config_override)
    except BaseException:
        # No half-initialised repository: `init` can simply be run again.
        _empty_dir(base)
        base.rmdir()
        raise


def _empty_dir(path: Path) -> None:
    # The directory itself is kept: it may be a symlink target the user made.
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _generate_auth_keys(base: Path) -> None:
    private, public = base / "auth_private_key.pem", base / "auth_public_key.pem"
    try:
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError) as e:
        # Only fatal with authentication enabled, which this implementation does not support.
        print(f"Warning: failed to generate auth keys: {e}")
        print("Warning: continuing without auth keys")


def cmd_start(args: argparse.Namespace) -> None:
    env = _load_env()
    start_broker(env)
    for ps in env.pageservers:
        try:
            start_pageserver(env, ps, args.pageserver_config_override)
        except ProcessError as e:
            _stop_all(env, immediate=True)
            raise CommandError(f"pageserver {ps.id} start failed: {e}") from None
    for sk in env.safekeepers:
        try:
            start_safekeeper(env, sk, [])
        except ProcessError as e:
            _stop_all(env, immediate=False)
            raise CommandError(f"safekeeper {sk.id} start failed: {e}") from None


def cmd_stop(args: argparse.Namespace) -> None:
    env = _load_env()
    _stop_all(env, immediate=args.mode == "immediate")


def _stop_all(env: LocalEnv, *, immediate: bool) -> None:
    """Endpoints, pageservers, safekeepers, broker; a failure is printed and the rest still stops."""
    cplane = ComputeControlPlane(env)
    for conf in cplane.endpoints().values():
        if cplane.status(conf) != "stopped":
            # `-m immediate` also stops computes at once: nothing waits for a pageserver then.
            _report_failure(
                "postgres stop failed", lambda conf=conf: asyncio.run(cplane.stop(conf, immediate=immediate))
            )
    for ps in env.pageservers:
        _report_failure(f"pageserver {ps.id} stop failed", lambda ps=ps: stop_pageserver(env, ps, immediate=immediate))
    for sk in env.safekeepers:
        _report_failure(f"safekeeper {sk.id} stop failed", lambda sk=sk: stop_safekeeper(env, sk, immediate=immediate))
    _report_failure("neon broker stop failed", lambda: stop_broker(env))


def _report_failure(what: str, action: Callable[[], object]) -> None:
    try:
        action()
    except Exception as e:
        print(f"{what}: {e}", file=sys.stderr)


# --- tenant ----------------------------------------------------------------------------------------
def _load_env() -> LocalEnv:
    return LocalEnv.load(repo_dir())


def _pageserver_client(env: LocalEnv, ps_id: int | None = None) -> PageserverClient:
    ps = env.pageserver(ps_id)
    return PageserverClient(ps.listen_http_addr, ps.id)


def cmd_tenant_list(args: argparse.Namespace) -> None:
    env = _load_env()
    for tenant in _pageserver_client(env).tenant_list():
        print(f"{tenant['id']} {tenant_state_text(tenant['state'])}")


def cmd_tenant_create(args: argparse.Namespace) -> None:
    env = _load_env()
    _check_pg_version(args.pg_version)
    settings = parse_tenant_settings(args.config)
    client = _pageserver_client(env)
    tenant_id = client.tenant_create(args.tenant_id, settings)
    print(f"tenant {tenant_id} successfully created on the pageserver")
    timeline_id = args.timeline_id or _new_id()
    info = client.timeline_create(tenant_id, timeline_id, pg_version=args.pg_version)
    env.register_branch_mapping(DEFAULT_BRANCH_NAME, tenant_id, timeline_id)
    print(f"Created an initial timeline '{timeline_id}' at Lsn {info['last_record_lsn']} for tenant: {tenant_id}")
    if args.set_default:
        print(f"Setting tenant {tenant_id} as a default one")
        env.default_tenant_id = tenant_id
    env.save()


def cmd_tenant_set_default(args: argparse.Namespace) -> None:
    env = _load_env()
    print(f"Setting tenant {args.tenant_id} as a default one")
    env.default_tenant_id = args.tenant_id
    env.save()


def cmd_tenant_config(args: argparse.Namespace) -> None:
    env = _load_env()
    tenant_id = env.tenant_id_or_default(args.tenant_id)
    # Keys not given are sent unset: the call replaces the tenant's whole override set.
    _pageserver_client(env).tenant_config(tenant_id, parse_tenant_settings(args.config))
    print(f"tenant {tenant_id} successfully configured on the pageserver")


# --- timeline --------------------------------------------------------------------------------------
def cmd_timeline_list(args: argparse.Namespace) -> None:
    env = _load_env()
    tenant_id = env.tenant_id_or_default(args.tenant_id)
    timelines = _pageserver_client(env).timeline_list(tenant_id)
    names = env.branch_names_by_timeline(tenant_id)
    for line in render_timeline_tree(timelines, names):
        print(line)


def render_timeline_tree(timelines: list[dict[str, Any]], names: dict[str, str]) -> list[str]:
    """Neon's branch tree: `name [id]` for roots, `┣━ @lsn: name [id]` / `┗━ …` for children,
    deeper levels padded with `┃  ` (the ancestor has later siblings) or three spaces."""
    by_id = {t["timeline_id"]: t for t in timelines}
    children: dict[str, list[dict[str, Any]]] = {}
    roots = []
    for t in timelines:
        parent = t.get("ancestor_timeline_id")
        if parent and parent in by_id:
            children.setdefault(parent, []).append(t)
        else:
            roots.append(t)
    lines: list[str] = []

    def visit(t: dict[str, Any], is_last: list[bool]) -> None:
        label = f"{names.get(t['timeline_id'], '_no_name_')} [{t['timeline_id']}]"
        if is_last:
            padding = "".join("   " if last else "┃  " for last in is_last[:-1])
            branch = "┗━" if is_last[-1] else "┣━"
            label = f"{padding}{branch} @{t.get('ancestor_lsn')}: {label}"
        lines.append(label)
        kids = sorted(children.get(t["timeline_id"], []), key=lambda c: c["timeline_id"])
        for i, child in enumerate(kids):
            visit(child, [*is_last, i == len(kids) - 1])

    for root in roots:
        visit(root, [])
    return lines


def cmd_timeline_create(args: argparse.Namespace) -> None:
    env = _load_env()
    tenant_id = env.tenant_id_or_default(args.tenant_id)
    _check_pg_version(args.pg_version)
    _refuse_mapped_branch(env, args.branch_name, tenant_id)
    timeline_id = args.timeline_id or _new_id()
    info = _pageserver_client(env).timeline_create(tenant_id, timeline_id, pg_version=args.pg_version)
    env.register_branch_mapping(args.branch_name, tenant_id, timeline_id)
    env.save()
    print(f"Created timeline '{timeline_id}' at Lsn {info['last_record_lsn']} for tenant: {tenant_id}")


def cmd_timeline_branch(args: argparse.Namespace) -> None:
    env = _load_env()
    tenant_id = env.tenant_id_or_default(args.tenant_id)
    ancestor_name = args.ancestor_branch_name or DEFAULT_BRANCH_NAME
    ancestor_id = env.branch_timeline_id(ancestor_name, tenant_id)
    if ancestor_id is None:
        raise CommandError(f"Found no timeline id for branch name '{ancestor_name}'")
    _refuse_mapped_branch(env, args.branch_name, tenant_id)
    timeline_id = args.timeline_id or _new_id()
    info = _pageserver_client(env).timeline_create(
        tenant_id, timeline_id, ancestor_timeline_id=ancestor_id, ancestor_start_lsn=args.ancestor_start_lsn
    )
    env.register_branch_mapping(args.branch_name, tenant_id, timeline_id)
    env.save()
    print(
        f"Created timeline '{timeline_id}' at Lsn {info['last_record_lsn']} for tenant: {tenant_id}. "
        f"Ancestor timeline: '{ancestor_name}'"
    )


def _refuse_mapped_branch(env: LocalEnv, branch_name: str, tenant_id: str) -> None:
    # Checked before the pageserver creates anything, so a refused name leaves no stray timeline.
    existing = env.branch_timeline_id(branch_name, tenant_id)
    if existing is not None:
        raise CommandError(f"branch '{branch_name}' already exists in tenant {tenant_id} (timeline {existing})")


def cmd_mappings_map(args: argparse.Namespace) -> None:
    env = _load_env()
    env.register_branch_mapping(args.branch_name, args.tenant_id, args.timeline_id)
    env.save()


# --- endpoint --------------------------------------------------------------------------------------
def cmd_endpoint_list(args: argparse.Namespace) -> None:
    env = _load_env()
    tenant_id = env.tenant_id_or_default(args.tenant_id)
    cplane = ComputeControlPlane(env)
    try:
        last_lsns = {t["timeline_id"]: t["last_record_lsn"] for t in _pageserver_client(env).timeline_list(tenant_id)}
    except ApiError as e:
        print(f"Failed to load timeline info: {e}", file=sys.stderr)
        last_lsns = {}
    names = env.branch_names_by_timeline(tenant_id)
    rows = [["ENDPOINT", "ADDRESS", "TIMELINE", "BRANCH NAME", "LSN", "STATUS"]]
    for endpoint_id, conf in cplane.endpoints().items():
        if conf.tenant_id != tenant_id:
            continue
        lsn = conf.static_lsn or last_lsns.get(conf.timeline_id, "?")
        rows.append(
            [
                endpoint_id,
                f"127.0.0.1:{conf.pg_port}",
                conf.timeline_id,
                names.get(conf.timeline_id, "?"),
                lsn,
                cplane.status(conf),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print((" " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))).rstrip())


def _resolve_branch(env: LocalEnv, tenant_id: str, branch_name: str | None) -> str:
    name = branch_name or DEFAULT_BRANCH_NAME
    timeline_id = env.branch_timeline_id(name, tenant_id)
    if timeline_id is None:
        raise CommandError(f"Found no timeline id for branch name '{name}'")
    return timeline_id


def _create_endpoint(env: LocalEnv, args: argparse.Namespace, endpoint_id: str, tenant_id: str) -> EndpointConf:
    if args.lsn is not None and args.hot_standby:
        raise CommandError("cannot specify both lsn and hot-standby")
    if args.hot_standby:
        raise CommandError("hot standby endpoints are not supported by this implementation")
    _check_pg_version(args.pg_version)
    env.pageserver(args.pageserver_id)
    timeline_id = _resolve_branch(env, tenant_id, args.branch_name)
    return ComputeControlPlane(env).new_endpoint(
        endpoint_id,
        tenant_id=tenant_id,
        timeline_id=timeline_id,
        lsn=args.lsn,
        pg_port=args.pg_port,
        http_port=args.http_port,
        pageserver_id=args.pageserver_id,
        pg_version=args.pg_version,
    )


def cmd_endpoint_create(args: argparse.Namespace) -> None:
    env = _load_env()
    tenant_id = env.tenant_id_or_default(args.tenant_id)
    endpoint_id = args.endpoint_id or f"ep-{args.branch_name or DEFAULT_BRANCH_NAME}"
    _create_endpoint(env, args, endpoint_id, tenant_id)


def cmd_endpoint_start(args: argparse.Namespace) -> None:
    env = _load_env()
    tenant_id = env.tenant_id_or_default(args.tenant_id)
    cplane = ComputeControlPlane(env)
    conf = cplane.get(args.endpoint_id)
    if conf is not None:
        if args.hot_standby:
            raise CommandError(
                "Cannot start a node in hot standby mode when it is already configured as a static or primary node"
            )
        print(f"Starting existing endpoint {args.endpoint_id}...")
    else:
        timeline_id = _resolve_branch(env, tenant_id, args.branch_name)
        _check_timeline(env, args.pageserver_id, tenant_id, timeline_id)
        print(
            f"Starting new endpoint {args.endpoint_id} (PostgreSQL v{args.pg_version}) on timeline {timeline_id} ...",
            flush=True,
        )
        conf = _create_endpoint(env, args, args.endpoint_id, tenant_id)
    _check_timeline(env, conf.pageserver_id, conf.tenant_id, conf.timeline_id)
    if cplane.status(conf) == "running":
        raise CommandError("The endpoint is already running")
    if args.safekeepers is not None:
        wanted = {int(x) for x in args.safekeepers.split(",") if x.strip()}
        unknown = wanted - {sk.id for sk in env.safekeepers}
        if unknown:
            raise CommandError(f"could not find safekeeper {min(unknown)}")
        env.safekeepers = [sk for sk in env.safekeepers if sk.id in wanted]
    print(f"Starting postgres node at 'postgresql://cloud_admin@127.0.0.1:{conf.pg_port}/postgres'", flush=True)
    asyncio.run(cplane.start(conf))


def _check_timeline(env: LocalEnv, ps_id: int, tenant_id: str, timeline_id: str) -> None:
    """The pageserver answers and has the timeline: a clear error before anything is spawned."""
    _pageserver_client(env, ps_id).timeline_detail(tenant_id, timeline_id)


def cmd_endpoint_stop(args: argparse.Namespace) -> None:
    env = _load_env()
    env.tenant_id_or_default(args.tenant_id)
    cplane = ComputeControlPlane(env)
    conf = cplane.get(args.endpoint_id)
    if conf is None:
        raise CommandError(f"postgres endpoint {args.endpoint_id} is not found")
    asyncio.run(cplane.stop(conf, destroy=args.destroy))


# --- pageserver / safekeeper / storage_broker ------------------------------------------------------
def _ps_id(args: argparse.Namespace) -> int | None:
    return args.ps_id if args.ps_id is not None else args.ps_id_global


def cmd_pageserver_status(args: argparse.Namespace) -> None:
    env = _load_env()
    try:
        _pageserver_client(env, _ps_id(args)).status(timeout=5)
    except ApiError as e:
        raise CommandError(f"Page server is not available: {e}") from None
    print("Page server is up and running")


def cmd_pageserver_start(args: argparse.Namespace) -> None:
    env = _load_env()
    ps = env.pageserver(_ps_id(args))
    try:
        start_pageserver(env, ps, args.pageserver_config_override)
    except ProcessError as e:
        raise CommandError(f"pageserver start failed: {e}") from None


def cmd_pageserver_stop(args: argparse.Namespace) -> None:
    env = _load_env()
    ps = env.pageserver(_ps_id(args))
    try:
        stop_pageserver(env, ps, immediate=args.stop_mode == "immediate")
    except ProcessError as e:
        raise CommandError(f"pageserver stop failed: {e}") from None


def cmd_pageserver_restart(args: argparse.Namespace) -> None:
    env = _load_env()
    ps = env.pageserver(_ps_id(args))
    try:
        stop_pageserver(env, ps)
        start_pageserver(env, ps, args.pageserver_config_override)
    except ProcessError as e:
        raise CommandError(f"pageserver restart failed: {e}") from None


def cmd_safekeeper_start(args: argparse.Namespace) -> None:
    env = _load_env()
    sk = env.safekeeper(args.id)
    try:
        start_safekeeper(env, sk, args.safekeeper_extra_opt)
    except ProcessError as e:
        raise CommandError(f"safekeeper start failed: {e}") from None


def cmd_safekeeper_stop(args: argparse.Namespace) -> None:
    env = _load_env()
    sk = env.safekeeper(args.id)
    try:
        stop_safekeeper(env, sk, immediate=args.stop_mode == "immediate")
    except ProcessError as e:
        raise CommandError(f"safekeeper stop failed: {e}") from None


def cmd_safekeeper_restart(args: argparse.Namespace) -> None:
    env = _load_env()
    sk = env.safekeeper(args.id)
    try:
        stop_safekeeper(env, sk, immediate=args.stop_mode == "immediate")
        start_safekeeper(env, sk, args.safekeeper_extra_opt)
    except ProcessError as e:
        raise CommandError(f"safekeeper restart failed: {e}") from None


def cmd_broker_start(args: argparse.Namespace) -> None:
    env = _load_env()
    try:
        start_broker(env)
    except ProcessError as e:
        raise CommandError(f"broker start failed: {e}") from None


def cmd_broker_stop(args: argparse.Namespace) -> None:
    env = _load_env()
    try:
        stop_broker(env)
    except ProcessError as e:
        raise CommandError(f"broker stop failed: {e}") from None


def cmd_broker_restart(args: argparse.Namespace) -> None:
    cmd_broker_stop(args)
    cmd_broker_start(args)


def cmd_pg_renamed(args: argparse.Namespace) -> None:
    raise CommandError("'pg' subcommand has been renamed to 'endpoint'")


# --- parsers ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neon_local", description="Neon CLI: a local Neon deployment.")
    parser.add_argument("--version", action="version", version="neon_local (neon-py)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(parent: Any, name: str, handler: Callable[[argparse.Namespace], None], help: str) -> Any:
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    def group(name: str, help: str, **kwargs: Any) -> tuple[Any, Any]:
        p = commands.add_parser(name, help=help, description=help, **kwargs)
        p.set_defaults(handler=None, parser=p)
        return p, p.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")

    def stop_mode(p: Any, dest: str = "stop_mode") -> None:
        p.add_argument(
            "-m",
            "--mode",
            dest=dest,
            choices=("fast", "immediate"),
            default="fast",
            help="'immediate': kill (SIGKILL) without flushing; default 'fast' (SIGTERM)",
        )

    def overrides(p: Any) -> None:
        p.add_argument(
            "--pageserver-config-override",
            action="append",
            default=[],
            metavar="TOML",
            help='an extra `-c` option for the pageserver, e.g. "checkpoint_distance=1048576"',
        )

    def tenant_id(p: Any) -> None:
        p.add_argument("--tenant-id", type=_hex_id, help="32 hexadecimal characters (default: the default tenant)")

    p = command(commands, "init", cmd_init, "Initialize a new Neon repository")
    p.add_argument("--config", help="TOML describing the deployment (default: Neon's built-in one)")
    p.add_argument("--pg-version", type=int, default=DEFAULT_PG_VERSION)
    p.add_argument("--force", action="store_true", help="remove all contents of an existing repository first")
    overrides(p)

    p = command(commands, "start", cmd_start, "Start the broker, pageservers and safekeepers")
    overrides(p)
    p = command(commands, "stop", cmd_stop, "Stop endpoints, pageservers, safekeepers and the broker")
    stop_mode(p, "mode")

    _, tenant = group("tenant", "Manage tenants")
    command(tenant, "list", cmd_tenant_list, "List the tenants of the pageserver")
    p = command(tenant, "create", cmd_tenant_create, "Create a tenant and its initial timeline (branch 'main')")
    tenant_id(p)
    p.add_argument("--timeline-id", type=_hex_id, help="id of the initial timeline")
    p.add_argument("-c", dest="config", action="append", default=[], metavar="KEY:VALUE", help="tenant setting")
    p.add_argument("--pg-version", type=int, default=DEFAULT_PG_VERSION)
    p.add_argument("--set-default", action="store_true", help="make it the default tenant")
    p = command(tenant, "set-default", cmd_tenant_set_default, "Make a tenant the default one")
    p.add_argument("--tenant-id", type=_hex_id, required=True)
    p = command(tenant, "config", cmd_tenant_config, "Replace a tenant's configuration overrides")
    tenant_id(p)
    p.add_argument("-c", dest="config", action="append", default=[], metavar="KEY:VALUE", help="tenant setting")

    _, timeline = group("timeline", "Manage timelines")
    p = command(timeline, "list", cmd_timeline_list, "Print the branch tree of a tenant")
    tenant_id(p)
    p = command(timeline, "create", cmd_timeline_create, "Create a new root timeline")
    p.add_argument("--branch-name", required=True, help="name for the new timeline")
    tenant_id(p)
    p.add_argument("--timeline-id", type=_hex_id)
    p.add_argument("--pg-version", type=int, default=DEFAULT_PG_VERSION)
    p = command(timeline, "branch", cmd_timeline_branch, "Create a timeline branching off another")
    p.add_argument("--branch-name", required=True, help="name for the new timeline")
    tenant_id(p)
    p.add_argument("--timeline-id", type=_hex_id)
    p.add_argument("--ancestor-branch-name", help="branch to branch off (default 'main')")
    p.add_argument("--ancestor-start-lsn", type=_lsn, help="branch point (default: the ancestor's last record)")

    _, endpoint = group("endpoint", "Manage compute endpoints")
    p = command(endpoint, "list", cmd_endpoint_list, "List a tenant's endpoints")
    tenant_id(p)
    for name, handler in (("create", cmd_endpoint_create), ("start", cmd_endpoint_start)):
        helps = {"create": "Create a compute endpoint", "start": "Start an endpoint (creating it first if needed)"}
        p = command(endpoint, name, handler, helps[name])
        p.add_argument("endpoint_id", nargs="?" if name == "create" else None, help="endpoint id (a directory name)")
        tenant_id(p)
        p.add_argument("--branch-name", help="branch the endpoint runs on (default 'main')")
        p.add_argument("--lsn", type=_lsn, help="a read-only (static) endpoint at this LSN")
        p.add_argument("--pg-port", type=int)
        p.add_argument("--http-port", type=int)
        p.add_argument("--pageserver-id", type=int, default=1)
        p.add_argument("--pg-version", type=int, default=DEFAULT_PG_VERSION)
        p.add_argument("--hot-standby", type=_bool, default=False, metavar="BOOL")
        if name == "create":
            p.add_argument("--config-only", help="accepted and unused, as Neon's")
        else:
            p.add_argument("--timeline-id", type=_hex_id, help="accepted and unused, as Neon's")
            p.add_argument("--safekeepers", metavar="IDS", help="comma-separated safekeeper ids (default: all)")
    p = command(endpoint, "stop", cmd_endpoint_stop, "Stop an endpoint")
    p.add_argument("endpoint_id")
    tenant_id(p)
    p.add_argument("--destroy", action="store_true", help="stop immediately and delete the endpoint directory")

    pageserver, ps_cmds = group("pageserver", "Manage pageservers")
    pageserver.add_argument("--id", dest="ps_id_global", type=int, help="pageserver id (default: the first)")
    for name, handler in (
        ("status", cmd_pageserver_status),
        ("start", cmd_pageserver_start),
        ("stop", cmd_pageserver_stop),
        ("restart", cmd_pageserver_restart),
    ):
        p = command(ps_cmds, name, handler, f"{name.capitalize()} a pageserver")
        p.add_argument("--id", dest="ps_id", type=int, help="pageserver id (default: the first)")
        if name in ("start", "restart"):
            overrides(p)
        if name == "stop":
            stop_mode(p)

    _, sk_cmds = group("safekeeper", "Manage safekeepers")
    for name, handler in (
        ("start", cmd_safekeeper_start),
        ("stop", cmd_safekeeper_stop),
        ("restart", cmd_safekeeper_restart),
    ):
        p = command(sk_cmds, name, handler, f"{name.capitalize()} a safekeeper")
        p.add_argument("id", type=int, nargs="?", default=1, help="safekeeper id (default 1)")
        if name != "start":
            stop_mode(p)
        if name != "stop":
            p.add_argument(
                "-e",
                "--safekeeper-extra-opt",
                action="append",
                default=[],
                metavar="OPT",
                help="extra safekeeper option, e.g. -e=--no-sync",
            )

    _, broker_cmds = group("storage_broker", "Manage the storage broker", aliases=["storage-broker"])
    command(broker_cmds, "start", cmd_broker_start, "Start the storage broker")
    p = command(broker_cmds, "stop", cmd_broker_stop, "Stop the storage broker")
    stop_mode(p)
    command(broker_cmds, "restart", cmd_broker_restart, "Restart the storage broker")

    _, mappings = group("mappings", "Manage branch-name mappings")
    p = command(mappings, "map", cmd_mappings_map, "Map a branch name to a timeline (no daemon is contacted)")
    p.add_argument("--branch-name", required=True)
    p.add_argument("--tenant-id", type=_hex_id, required=True)
    p.add_argument("--timeline-id", type=_hex_id, required=True)

    p = commands.add_parser("pg", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(handler=cmd_pg_renamed)
    return parser


def _route_library_logs(base: Path) -> None:
    """The compute and libpq modules log through structlog: into `.neon/neon_local.log`, never
    onto the console this command reports on."""
    target = base / "neon_local.log" if base.is_dir() else Path(os.devnull)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=open(target, "a")),  # noqa: SIM115 - for the process
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.handler is None:
        args.parser.print_help()
        return 2
    _route_library_logs(repo_dir())
    try:
        args.handler(args)
    except (CommandError, ConfigError, ApiError, ProcessError, EndpointError, PgDistribError) as e:
        print(f"command failed: {e}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError, ValueError) as e:
        print(f"command failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("command interrupted", file=sys.stderr)
        return 130
    return 0
