"""The safekeeper: a Paxos acceptor that stores a compute's WAL durably and serves it to pageservers.

Modules: `protocol` (the proposer/acceptor wire codec), `control_file` (the durable per-timeline
state), `wal_storage` (WAL segment files), and the daemon built on them.
"""
