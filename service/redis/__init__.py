"""Redis transport: opening the client, finding where a channel lives, and driving pub/sub and
one-shot connections by hand.

The only package allowed to touch redis-py's internals: private attributes (a connection's
`_reader`, a pool's `_in_use_connections`, a Sentinel client's `_sentinels`), connections
taken from a pool and driven by hand, the shape of the cluster client's node table, and the
hiredis parser and fakeredis stand-in below the client. Everything outside uses redis-py's
public client API, so a redis-py upgrade is checked here. Checked against redis-py 8.0 and
8.1; pyproject.toml caps redis below 8.2 until the suite passes on the next minor release.

The `redis+sentinel://` URL grammar stays in `service.sentinel_url`: it is pure parsing that
settings validates with, and this package builds on settings.
"""
