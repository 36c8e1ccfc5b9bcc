"""`neon_local`: the local control plane CLI (spec control-plane Part 1).

A one-shot command: every invocation loads `.neon/config`, does its job (spawning daemons in the
background, calling their HTTP APIs, starting compute endpoints) and exits. Modules:
`config` (the `.neon/config` TOML), `processes` (spawning, pid files, readiness, stopping),
`services` (the broker, pageserver and safekeeper command lines and probes), `pageserver_api`
(the pageserver HTTP calls), `endpoints` (compute endpoints persisted under `.neon/endpoints/`)
and `cli` (the argparse command tree).
"""
