"""Where a timeline's WAL fdatasync runs, decided per flush for the whole safekeeper.

While WAL arrives for one timeline only, the fdatasync runs on the event loop: the loop has
nothing to do meanwhile that could not wait for it (the proposer holds small appends while one
is unanswered, walsenders wait for the commit LSN the next append brings), and handing the call
to a worker thread costs two cross-thread wake-ups per flush, measured at about a sixth of the
commit path's CPU on a 2-core machine (alternating `pgbench -N -c 4` runs). Once a second timeline
receives WAL, fdatasyncs go to worker threads so that timelines never wait for each other's
disk flushes. The price of the single-timeline case: while a flush is stuck on a dying disk,
the HTTP API and broker pushes of this safekeeper wait with it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WalSyncPlacement:
    """Counts the timelines that have at least one proposer connection (`Timelines` owns one,
    shared by its timelines)."""

    receiving: int = 0
    flushes_on_loop: int = 0
    flushes_in_thread: int = 0

    def timeline_started_receiving(self) -> None:
        self.receiving += 1

    def timeline_stopped_receiving(self) -> None:
        self.receiving = max(0, self.receiving - 1)

    def on_loop(self) -> bool:
        """Whether the flush about to start runs on the event loop (and counts it)."""
        if self.receiving <= 1:
            self.flushes_on_loop += 1
            return True
        self.flushes_in_thread += 1
        return False
