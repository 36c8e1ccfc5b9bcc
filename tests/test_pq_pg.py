"""`neon.pq` against real software: our client against stock PG15 (queries, errors, COPY, auth,
physical replication), and psycopg/libpq against our server (trust, password, md5, errors,
cancel, concurrency with a misbehaving client, shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from neon.pq.client import AuthenticationFailed, PgConnection, ReplicationStream, _socket_path, connect
from neon.pq.codec import NEED_DATA, ClientConnection, State
from neon.pq.errors import PgError, SqlState
from neon.pq.messages import (
    INT8_OID,
    DataRow,
    EncryptionResponse,
    ErrorResponse,
    GSSENCRequest,
    Query,
    SSLRequest,
    StartupMessage,
    decode_backend,
)
from neon.pq.replication import (
    PageserverFeedback,
    PrimaryKeepalive,
    StandbyStatusUpdate,
    XLogData,
    decode_client_message,
    pg_now,
)
from neon.pq.server import ClientDisconnected, Column, PqServer, Session
from neon.utils.lsn import Lsn
from tests.fixtures.vanilla import VanillaPostgres, make_test_root

pytestmark = pytest.mark.timeout(180)

WAL_SEGMENT = 16 * 1024 * 1024


# --- a stock PG15 shared by the client tests --------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[VanillaPostgres]:
    root = make_test_root(prefix="neon-pq-pg-")
    server = VanillaPostgres(root / "pg").init()
    server.configure(["max_wal_senders = 4", "wal_level = replica", "wal_sender_timeout = '4s'"])
    hba = server.datadir / "pg_hba.conf"
    # First match wins: these users authenticate by password; everyone else keeps initdb's trust.
    hba.write_text(
        "local all md5user md5\nlocal all pwuser password\nlocal all scramuser scram-sha-256\n" + hba.read_text()
    )
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


async def _connect(pg: VanillaPostgres, **kwargs: object) -> PgConnection:
    kwargs.setdefault("user", "cloud_admin")
    kwargs.setdefault("dbname", "postgres")
    return await connect(str(pg.sockdir), pg.port, **kwargs)  # type: ignore[arg-type]


async def test_queries_errors_and_parameters(pg: VanillaPostgres) -> None:
    async with await _connect(pg, application_name="pq-test") as conn:
        assert conn.parameters["server_version"].startswith("15")
        assert conn.parameters["application_name"] == "pq-test"
        assert conn.backend_pid is not None
        assert await conn.query("select 1, 'a'::text, null, 2.5::float8") == [("1", "a", None, "2.5")]
        results = await conn.query_results("select 1 as x; select generate_series(1, 3) as y; set work_mem = '8MB'")
        assert [r.tag for r in results] == ["SELECT 1", "SELECT 3", "SET"]
        assert [f.name for f in results[1].columns] == ["y"] and results[1].columns[0].type_oid == 23
        assert results[1].rows == [("1",), ("2",), ("3",)]
        assert (await conn.query_results(""))[0].tag is None

        with pytest.raises(PgError) as e:
            await conn.query("selec 1")
        assert e.value.sqlstate == SqlState.SYNTAX_ERROR and "syntax error" in e.value.message
        with pytest.raises(PgError) as e:
            await conn.query("select * from no_such_table")
        assert e.value.sqlstate == SqlState.UNDEFINED_TABLE
        assert not conn.closed
        assert await conn.query("select 42") == [("42",)]

        await conn.execute("do $$ begin raise notice 'hello from plpgsql'; end $$")
        assert any(n.message == "hello from plpgsql" for n in conn.notices)

        # Inside a failed transaction the server reports 'E' and keeps rejecting until ROLLBACK.
        await conn.execute("begin")
        assert conn.codec.transaction_status == "T"
        with pytest.raises(PgError):
            await conn.execute("select 1/0")
        assert conn.codec.transaction_status == "E"
        with pytest.raises(PgError) as e:
            await conn.execute("select 1")
        assert e.value.sqlstate == "25P02"
        await conn.execute("rollback")
        assert conn.codec.transaction_status == "I"


async def test_copy_in_and_out(pg: VanillaPostgres) -> None:
    async with await _connect(pg) as conn:
        await conn.execute("drop table if exists pq_copy; create table pq_copy (a int, b text)")
        tag = await conn.copy_in("copy pq_copy from stdin", [b"1\tone\n", b"2\ttwo\n3\t\\N\n"])
        assert tag == "COPY 3"
        stream = await conn.copy_out("copy (select * from pq_copy order by a) to stdout")
        chunks = [chunk async for chunk in stream]
        assert b"".join(chunks) == b"1\tone\n2\ttwo\n3\t\\N\n"
        assert (await stream.finish())[-1].tag == "COPY 3"
        # Bad data: the server's ErrorResponse ends the copy; the connection stays usable.
        with pytest.raises(PgError) as e:
            await conn.copy_in("copy pq_copy from stdin", [b"not-a-number\tx\n"])
        assert e.value.sqlstate == "22P02"
        assert await conn.query("select count(*) from pq_copy") == [("3",)]


async def test_cancel(pg: VanillaPostgres) -> None:
    async with await _connect(pg) as conn:
        task = asyncio.create_task(conn.query("select pg_sleep(30)"))
        await asyncio.sleep(0.5)
        await conn.cancel()
        with pytest.raises(PgError) as e:
            await task
        assert e.value.sqlstate == SqlState.QUERY_CANCELED
        assert await conn.query("select 1") == [("1",)]


async def test_password_authentication_against_postgres(pg: VanillaPostgres) -> None:
    async with await _connect(pg) as admin:
        await admin.execute(
            "set password_encryption = 'md5';"
            "drop role if exists md5user; create role md5user login password 'md5pw';"
            "drop role if exists pwuser; create role pwuser login password 'clearpw';"
            "set password_encryption = 'scram-sha-256';"
            "drop role if exists scramuser; create role scramuser login password 'scrampw'"
        )
        await admin.query("select pg_reload_conf()")
    # The reload is asynchronous: wait until the md5 rule is in force.
    for _ in range(50):
        try:
            await (await _connect(pg, user="md5user")).close()
        except AuthenticationFailed:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("pg_hba.conf reload did not take effect")

    async with await _connect(pg, user="md5user", password="md5pw") as conn:
        assert await conn.query("select current_user") == [("md5user",)]
    async with await _connect(pg, user="pwuser", password="clearpw") as conn:
        assert await conn.query("select current_user") == [("pwuser",)]
    for user, password in [("md5user", "wrong"), ("pwuser", "wrong")]:
        with pytest.raises(PgError) as e:
            await _connect(pg, user=user, password=password)
        assert e.value.sqlstate == SqlState.INVALID_PASSWORD and e.value.is_fatal
    with pytest.raises(AuthenticationFailed, match="SASL"):
        await _connect(pg, user="scramuser", password="scrampw")


# --- physical replication ----------------------------------------------------------------------


def _system_identifier(pg: VanillaPostgres) -> int:
    out = pg.user.run([pg.pg_bin("pg_controldata"), "-D", pg.datadir]).stdout
    match = re.search(r"Database system identifier:\s+(\d+)", out)
    assert match, out
    return int(match.group(1))


def _wal_bytes(pg: VanillaPostgres, lsn: int, n: int) -> bytes:
    """Bytes of pg_wal (timeline 1) at `lsn`, possibly across segment files."""
    out = b""
    while n > 0:
        segno, off = divmod(lsn, WAL_SEGMENT)
        name = f"{1:08X}{segno // 256:08X}{segno % 256:08X}"
        take = min(n, WAL_SEGMENT - off)
        with open(pg.wal_dir / name, "rb") as f:
            f.seek(off)
            out += f.read(take)
        lsn += take
        n -= take
    return out


class Receiver:
    """Consumes a replication stream in the background the way a standby does."""

    def __init__(self, stream: ReplicationStream) -> None:
        self.stream = stream
        self.xlog: list[XLogData] = []
        self.keepalives: list[PrimaryKeepalive] = []
        self.replies = 0
        self.reported = Lsn(0)
        self.progress = asyncio.Event()

    async def run(self) -> None:
        async for msg in self.stream:
            if isinstance(msg, XLogData):
                self.xlog.append(msg)
            else:
                self.keepalives.append(msg)
                if msg.reply_requested:
                    await self.report()
                    self.replies += 1
            self.progress.set()

    async def report(self, reply: bool = False) -> None:
        self.reported = self.stream.last_received
        await self.stream.send_status(self.reported, self.reported, self.reported, reply)

    async def wait_for(self, lsn: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while self.stream.last_received < lsn:
                self.progress.clear()
                await self.progress.wait()


async def test_physical_replication(pg: VanillaPostgres) -> None:
    repl = await _connect(pg, replication=True, application_name="pq-walreceiver")
    sql = await _connect(pg)
    try:
        ident = await repl.identify_system()
        assert ident.systemid == _system_identifier(pg)
        assert ident.timeline == 1 and ident.dbname is None
        flush = Lsn.parse((await sql.query("select pg_current_wal_flush_lsn()"))[0][0])  # type: ignore[arg-type]
        assert ident.xlogpos <= flush

        stream = await repl.start_replication(ident.xlogpos, timeline=ident.timeline)
        receiver = Receiver(stream)
        task = asyncio.create_task(receiver.run())
        try:
            await sql.execute("drop table if exists pq_repl; create table pq_repl (a int, b text)")
            for i in range(5):
                await sql.execute(
                    f"insert into pq_repl select g, repeat('x', 100) from generate_series(1, 200) g -- {i}"
                )
            target = Lsn.parse((await sql.query("select pg_current_wal_flush_lsn()"))[0][0])  # type: ignore[arg-type]
            await receiver.wait_for(target)

            # The stream is byte-contiguous from the requested start and equals pg_wal.
            assert receiver.xlog[0].wal_start == ident.xlogpos
            for prev, cur in zip(receiver.xlog, receiver.xlog[1:], strict=False):
                assert cur.wal_start == prev.data_end
            start, end = receiver.xlog[0].wal_start, receiver.xlog[-1].data_end
            assert b"".join(x.data for x in receiver.xlog) == _wal_bytes(pg, start, end - start)
            assert all(x.wal_end >= x.data_end for x in receiver.xlog)

            # Asking for a reply gets a keepalive; idling gets keepalives with reply requested
            # (wal_sender_timeout is 4 s), which the receiver answers with 'r'.
            n_keepalives = len(receiver.keepalives)
            await receiver.report(reply=True)
            async with asyncio.timeout(10):
                while receiver.replies == 0 or len(receiver.keepalives) <= n_keepalives:
                    await asyncio.sleep(0.05)
            assert any(k.reply_requested for k in receiver.keepalives)
            # Postgres shows what we reported.
            expected = str(receiver.reported)
            async with asyncio.timeout(10):
                while True:
                    rows = await sql.query(
                        "select write_lsn, flush_lsn, replay_lsn, state from pg_stat_replication "
                        "where application_name = 'pq-walreceiver'"
                    )
                    if rows and rows[0][1] == expected:
                        break
                    await asyncio.sleep(0.1)
            assert rows[0][0] == expected and rows[0][2] == expected and rows[0][3] == "streaming"
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # Ending the stream from our side returns the connection to idle.
        results = await stream.stop()
        assert results[-1].tag == "START_REPLICATION"
        assert (await repl.identify_system()).systemid == ident.systemid
    finally:
        await repl.close()
        await sql.close()


async def test_replication_errors(pg: VanillaPostgres) -> None:
    async with await _connect(pg, replication=True) as repl:
        # Postgres sends CopyBothResponse before checking the start point, so the error
        # arrives inside the stream; afterwards the connection is idle again.
        stream = await repl.start_replication(Lsn(0xFF_0000_0000))
        with pytest.raises(PgError) as e:
            async for _ in stream:
                pass
        assert "ahead of the WAL flush position" in e.value.message
        assert (await repl.identify_system()).timeline == 1
        with pytest.raises(PgError) as e:
            await repl.start_replication(Lsn(0x1000000), slot="no_such_slot")
        assert e.value.sqlstate == "42704"
        assert (await repl.identify_system()).timeline == 1


# --- psycopg against our server --------------------------------------------------------------


class DemoHandler:
    def __init__(self, session: Session) -> None:
        self.session = session

    async def query(self, sql: str) -> None:
        s = self.session
        cmd = sql.split(" --")[0].strip().rstrip(";")
        if cmd == "select rows":
            await s.send_rows([Column("id", INT8_OID), "name"], [(1, "one"), (2, None)])
        elif cmd == "whoami":
            await s.send_rows(
                ["user", "database", "application_name", "ssl_refused"],
                [(s.user, s.database, s.application_name, s.encryption_refused)],
            )
        elif cmd.startswith("sleep "):
            await asyncio.sleep(float(cmd.split()[1]))
            await s.send_rows(["slept"], [("yes",)])
        elif cmd == "fail politely":
            await s.send_error(SqlState.UNDEFINED_OBJECT, "no such thing", hint="try another")
        elif cmd.lower().startswith("set "):
            await s.command_complete("SET")
        else:
            raise PgError(f"unknown command {cmd}", SqlState.INTERNAL_ERROR)


@pytest.fixture
async def trust_server() -> AsyncIterator[PqServer]:
    server = await PqServer(DemoHandler).start("127.0.0.1", 0)
    yield server
    await server.stop()


def _dsn(server: PqServer, **extra: str) -> str:
    parts = {"host": "127.0.0.1", "port": str(server.port), "user": "alice", "dbname": "db", **extra}
    return " ".join(f"{k}={v}" for k, v in parts.items())


async def test_psycopg_trust(trust_server: PqServer) -> None:
    dsn = _dsn(trust_server, sslmode="prefer", application_name="psy")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        assert conn.info.server_version == 140001
        cur = await conn.execute("select rows")
        assert await cur.fetchall() == [(1, "one"), (2, None)]
        assert [d.name for d in cur.description or []] == ["id", "name"]
        cur = await conn.execute("whoami")
        # libpq with sslmode=prefer asks for TLS first; we said 'N' and it carried on.
        assert await cur.fetchall() == [("alice", "db", "psy", "1")]
        with pytest.raises(psycopg.errors.InternalError_) as e:
            await conn.execute("frobnicate")
        assert e.value.sqlstate == "XX000" and "unknown command frobnicate" in str(e.value)
        with pytest.raises(psycopg.errors.UndefinedObject) as e2:
            await conn.execute("fail politely")
        assert e2.value.diag.message_hint == "try another"
        cur = await conn.execute("select rows")
        assert len(await cur.fetchall()) == 2
        await conn.execute("SET datestyle TO ISO")
        # An empty query gets EmptyQueryResponse, which psycopg reports as having no result.
        cur = await conn.execute("")
        assert cur.pgresult is not None and cur.pgresult.status == psycopg.pq.ExecStatus.EMPTY_QUERY


async def test_psycopg_cancel(trust_server: PqServer) -> None:
    async with await psycopg.AsyncConnection.connect(_dsn(trust_server), autocommit=True) as conn:
        task = asyncio.create_task(conn.execute("sleep 30"))
        await asyncio.sleep(0.3)
        await conn.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled):
            await task
        cur = await conn.execute("sleep 0")
        assert await cur.fetchall() == [("yes",)]


async def test_psycopg_extended_protocol(trust_server: PqServer) -> None:
    # psycopg uses Parse/Bind/Describe/Execute/Sync for queries with parameters; the server
    # emulates it (parameters are not interpreted, as in Neon).
    async with await psycopg.AsyncConnection.connect(_dsn(trust_server), autocommit=True) as conn:
        cur = await conn.execute("whoami", prepare=False, binary=False)
        assert (await cur.fetchall())[0][0] == "alice"
        cur = await conn.execute("select rows -- %s", ["ignored"])
        assert await cur.fetchall() == [(1, "one"), (2, None)]
        with pytest.raises(psycopg.errors.InternalError_):
            await conn.execute("nope %s", [1])
        cur = await conn.execute("select rows")
        assert len(await cur.fetchall()) == 2


async def test_psycopg_password_auth() -> None:
    seen: list[tuple[str, str]] = []

    async def check(user: str, password: str) -> bool:
        seen.append((user, password))
        return password == "s3cret"

    server = await PqServer(DemoHandler, auth=("password", check)).start()
    try:
        async with await psycopg.AsyncConnection.connect(_dsn(server, password="s3cret"), autocommit=True) as conn:
            cur = await conn.execute("whoami")
            assert (await cur.fetchall())[0][0] == "alice"
        assert seen == [("alice", "s3cret")]
        with pytest.raises(psycopg.OperationalError) as e:
            await psycopg.AsyncConnection.connect(_dsn(server, password="wrong"))
        assert 'password authentication failed for user "alice"' in str(e.value)
        # libpq does not hand psycopg the SQLSTATE of a failed connection; our client shows it.
        with pytest.raises(PgError) as e2:
            await connect("127.0.0.1", server.port, "alice", password="wrong")
        assert e2.value.sqlstate == SqlState.INVALID_PASSWORD and e2.value.severity == "FATAL"
        with pytest.raises(AuthenticationFailed, match="none was given"):
            await connect("127.0.0.1", server.port, "alice")
        async with await connect("127.0.0.1", server.port, "alice", password="s3cret") as ours:
            assert await ours.query("select rows") == [("1", "one"), ("2", None)]
    finally:
        await server.stop()


async def test_psycopg_md5_auth() -> None:
    passwords = {"alice": "pw-a", "bob": "md5" + __import__("hashlib").md5(b"pw-bbob").hexdigest()}
    server = await PqServer(DemoHandler, auth=("md5", passwords.get)).start()
    try:
        for user, pw in [("alice", "pw-a"), ("bob", "pw-b")]:
            dsn = _dsn(server, user=user, password=pw)
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                cur = await conn.execute("whoami")
                assert (await cur.fetchall())[0][0] == user
            async with await connect("127.0.0.1", server.port, user, password=pw) as ours:
                assert (await ours.query("whoami"))[0][0] == user
        for user in ("alice", "carol"):
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                await psycopg.AsyncConnection.connect(_dsn(server, user=user, password="bad"))
    finally:
        await server.stop()


async def _garbage_client(port: int, payload: bytes) -> list[ErrorResponse]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()  # until the server closes the connection
    finally:
        writer.close()
    errors = []
    pos = 0
    while pos < len(data):
        t, length = data[pos : pos + 1], int.from_bytes(data[pos + 1 : pos + 5], "big")
        msg = decode_backend(t, data[pos + 5 : pos + 1 + length])
        if isinstance(msg, ErrorResponse):
            errors.append(msg)
        pos += 1 + length
    return errors


async def test_concurrent_psycopg_clients_and_a_garbage_client() -> None:
    server = await PqServer(DemoHandler).start()
    try:

        async def good(i: int) -> list[tuple[object, ...]]:
            dsn = _dsn(server, application_name=f"c{i}")
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                rows: list[tuple[object, ...]] = []
                for _ in range(3):
                    cur = await conn.execute("sleep 0.02")
                    rows += await cur.fetchall()
                    cur = await conn.execute("whoami")
                    rows += await cur.fetchall()
                return rows

        http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        # A valid startup followed by a message of an unknown type.
        bad_message = StartupMessage({"user": "x"}).encode() + b"\x01\x00\x00\x00\x04"
        results = await asyncio.gather(
            *(good(i) for i in range(50)),
            _garbage_client(server.port, http),
            _garbage_client(server.port, bad_message),
        )
        for i, rows in enumerate(results[:50]):
            assert rows.count(("yes",)) == 3
            # libpq's default sslmode=prefer asks for TLS first: refused once per connection.
            assert ("alice", "db", f"c{i}", "1") in rows
        for errors in results[50:]:
            assert len(errors) == 1
            err = errors[0]
            assert err.severity == "FATAL" and err.sqlstate == SqlState.PROTOCOL_VIOLATION
        assert "exceeds the limit" in results[50][0].message
        assert "invalid frontend message type" in results[51][0].message
        # The server is still healthy afterwards.
        async with await connect("127.0.0.1", server.port, "alice") as ours:
            assert await ours.query("select rows") == [("1", "one"), ("2", None)]
    finally:
        await server.stop()


async def test_graceful_shutdown() -> None:
    server = await PqServer(DemoHandler).start()
    port = server.port
    idle = await connect("127.0.0.1", port, "alice")
    busy = await connect("127.0.0.1", server.port, "alice")
    query = asyncio.create_task(busy.query("sleep 0.5"))
    await asyncio.sleep(0.1)
    await server.stop(grace=5)
    # The running query was allowed to finish; then both connections were told why they end.
    assert await query == [("yes",)]
    for conn in (idle, busy):
        with pytest.raises((PgError, ConnectionError)) as e:
            await conn.query("select rows")
        if isinstance(e.value, PgError):
            assert e.value.sqlstate == SqlState.ADMIN_SHUTDOWN
        await conn.close()
    with pytest.raises(OSError):
        await connect("127.0.0.1", port, "alice", connect_timeout=2)


async def test_copy_both_through_our_server_and_client() -> None:
    class Echo:
        def __init__(self, session: Session) -> None:
            self.session = session

        async def query(self, sql: str) -> None:
            stream = await self.session.copy_both()
            async for data in stream:
                await stream.write(data.upper())
            await stream.done()
            await self.session.command_complete("ECHO")

    server = await PqServer(Echo).start()
    try:
        async with await connect("127.0.0.1", server.port, "alice") as conn:
            stream = await conn.copy_both("echo")
            for word in (b"abc", b"def"):
                await stream.write(word)
                assert await stream.read() == word.upper()
            results = await stream.finish()
            assert results[-1].tag == "ECHO"
            assert not conn.closed
    finally:
        await server.stop()


def test_socket_path_is_libpq_compatible() -> None:
    assert _socket_path("/run/pg/", 5432) == "/run/pg/.s.PGSQL.5432"


async def test_replication_client_against_our_walsender() -> None:
    """A walsender double speaking the safekeeper's side (safekeeper spec 4.3 and 4.4): our client's 'r' and 'z'."""
    received: list[object] = []

    class Walsender:
        def __init__(self, session: Session) -> None:
            self.session = session

        async def query(self, sql: str) -> None:
            if sql == "IDENTIFY_SYSTEM":
                await self.session.send_rows(
                    ["systemid", Column("timeline", 23), "xlogpos", "dbname"],
                    [("7000000000000000001", 1, "0/1696F00", None)],
                    tag="IDENTIFY_SYSTEM",
                )
                return
            assert sql == "START_REPLICATION PHYSICAL 0/1696F00"
            stream = await self.session.copy_both()
            await stream.write(XLogData(0x1696F00, 0x1697000, pg_now(), b"\x01" * 0x100).encode())
            await stream.write(PrimaryKeepalive(0x1697000, pg_now(), True).encode())
            for _ in range(2):
                data = await stream.read()
                assert data is not None
                received.append(decode_client_message(data))
            # Neon's way of ending a caught-up stream: an "error" with SQLSTATE 00000.
            await self.session.send_error(
                SqlState.SUCCESSFUL_COMPLETION, "ending streaming to pageserver at 0/1697000, receiver is caughtup"
            )

    server = await PqServer(Walsender).start()
    try:
        async with await connect("127.0.0.1", server.port, "ps", replication=True) as conn:
            ident = await conn.identify_system()
            assert ident == (7000000000000000001, 1, Lsn(0x1696F00), None)
            stream = await conn.start_replication(ident.xlogpos)
            with pytest.raises(PgError) as e:
                async for msg in stream:
                    if isinstance(msg, PrimaryKeepalive) and msg.reply_requested:
                        await stream.send_status(stream.last_received, 0x1696F00, 0, time=12345)
                        feedback = PageserverFeedback(1 << 20, stream.last_received, 0x1696F00, 0, pg_now())
                        await stream.send_neon_feedback(feedback)
            assert e.value.sqlstate == SqlState.SUCCESSFUL_COMPLETION and "ending streaming" in e.value.message
            assert stream.last_received == 0x1697000 and stream.server_wal_end == 0x1697000
            assert received[0] == StandbyStatusUpdate(0x1697000, 0x1696F00, 0, 12345, False)
            assert isinstance(received[1], PageserverFeedback)
            assert received[1].last_received_lsn == 0x1697000 and received[1].current_timeline_size == 1 << 20
            # The connection is usable again.
            assert (await conn.identify_system()).timeline == 1
    finally:
        await server.stop()


async def test_unix_socket_server() -> None:
    root = make_test_root(prefix="neon-pq-unix-")
    try:
        server = await PqServer(DemoHandler).start_unix(str(root / ".s.PGSQL.6543"))
        try:
            async with await connect(str(root), 6543, "alice") as ours:
                assert await ours.query("select rows") == [("1", "one"), ("2", None)]
            dsn = f"host={root} port=6543 user=alice dbname=db"
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                cur = await conn.execute("whoami")
                # No SSLRequest over a Unix socket.
                assert await cur.fetchall() == [("alice", "db", None, "0")]
        finally:
            await server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_encryption_requests_are_refused_then_startup_proceeds(trust_server: PqServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", trust_server.port)
    try:
        codec = ClientConnection()
        for request in (GSSENCRequest(), SSLRequest()):
            writer.write(codec.send(request))
            await writer.drain()
            assert await reader.readexactly(1) == b"N"
            codec.receive_data(b"N")
            assert codec.next_event() == EncryptionResponse(b"N")
        rows: list[tuple[bytes | None, ...]] = []

        async def until_ready() -> None:
            async with asyncio.timeout(10):
                while True:
                    ev = codec.next_event()
                    if ev is NEED_DATA:
                        codec.receive_data(await reader.read(65536))
                    elif isinstance(ev, DataRow):
                        rows.append(ev.values)
                    elif codec.state is State.READY:
                        return

        writer.write(codec.send(StartupMessage({"user": "alice"})))
        await until_ready()
        writer.write(codec.send(Query("whoami")))
        await until_ready()
        assert rows == [(b"alice", b"alice", None, b"2")]
    finally:
        writer.close()


async def test_handler_timeouts_are_query_errors_and_idle_timeout_disconnects() -> None:
    class Slow:
        def __init__(self, session: Session) -> None:
            self.session = session

        async def query(self, sql: str) -> None:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)

    server = await PqServer(Slow, idle_timeout=0.5).start()
    try:
        async with await connect("127.0.0.1", server.port, "alice") as conn:
            with pytest.raises(PgError) as e:
                await conn.query("wait")
            assert e.value.sqlstate == SqlState.INTERNAL_ERROR and "TimeoutError" in e.value.message
            await asyncio.sleep(1.0)
            with pytest.raises(ConnectionError):
                await conn.query("wait")
    finally:
        await server.stop()


def test_a_write_on_a_socket_closed_under_the_handler_is_a_disconnect() -> None:
    """Regression: a walsender writing after its socket was closed by a reset (seen by another
    task) got uvloop's RuntimeError, logged as "connection failed" with a traceback; asyncio
    dropped the bytes silently. Both loops must report it as the client leaving."""
    import uvloop

    async def scenario() -> BaseException | None:
        closed = asyncio.Event()
        outcome: list[BaseException | None] = []

        class LateWriter:
            def __init__(self, session: Session) -> None:
                self.session = session

            async def query(self, sql: str) -> None:
                stream = await self.session.copy_both()
                self.session._writer.transport.abort()  # what a reset seen elsewhere leaves behind
                closed.set()
                try:
                    await stream.write(b"late WAL")
                    outcome.append(None)
                except BaseException as e:
                    outcome.append(e)
                    raise

        server = await PqServer(LateWriter).start()
        try:
            conn = await connect("127.0.0.1", server.port, "alice")
            await conn.copy_both("stream")
            async with asyncio.timeout(10):
                await closed.wait()
                while not outcome:
                    await asyncio.sleep(0.01)  # the handler's write runs right after; bounded
            with contextlib.suppress(Exception):
                await conn.close()
        finally:
            await server.stop()
        return outcome[0]

    for factory in (asyncio.new_event_loop, uvloop.new_event_loop):
        with asyncio.Runner(loop_factory=factory) as runner:
            err = runner.run(scenario())
        assert isinstance(err, ClientDisconnected), (factory, err)
