"""The storage broker (`neon-broker`): stateless, best-effort gRPC pub/sub through which
safekeepers publish per-timeline state every second and safekeepers and pageservers subscribe
(spec safekeeper-and-broker §5). Wire-compatible with Neon's `storage_broker`.

    proto/broker.proto   the schema (package `storage_broker`, same messages/numbers as Neon)
    build_proto          generates `_generated/` (protobuf + gRPC modules) from it
    server               the broker's state, servicer and listeners
    client               `BrokerClient`, used by the safekeeper and the pageserver
    main                 the `neon-broker` command line
"""
