"""Run commands on Redis at most once, and say whether a failure means they may have run.

redis-py re-sends a command whose reply timed out or whose connection broke (the client's
`Retry`, pipelines included). For an idempotent read that is harmless; for the publish
script it is a second copy of the event, because a command that timed out may still run
(a busy or stalled server executes it when it wakes). Non-idempotent scripts therefore go
through `run_once`: one write on one connection, never repeated. A failure before anything
was sent is raised as is (nothing ran); once the bytes may have left, a failure is
`OutcomeUnknown`, and only the caller can decide what a retry means (an idempotency key,
a fence).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Command = Sequence[str | bytes | int | float]


class OutcomeUnknown(RedisError):
    """Commands were sent but their replies never came: they may or may not have run."""


async def run_once(
    client: Redis | RedisCluster, commands: Sequence[Command], key: str
) -> list[Any]:
    """Send `commands` (all for `key`'s slot) in one write; one reply each, errors as values.

    Raises the error as is when nothing was sent (no connection could be had), and
    `OutcomeUnknown` when the commands were, or may have been, sent but not all replies came.
    """
    if isinstance(client, RedisCluster):
        return await _run_on_cluster(client, commands, key)
    pool = client.connection_pool
    connection: Connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        if await connection.can_read():
            # Closed by the server (or holding stray data). redis-py 8's pools skip this
            # check while "maintenance notifications" are on, as they are by default, and
            # count on retrying instead; here it must be found before anything is sent.
            await connection.disconnect()
            await connection.connect()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(
                connection.pack_commands(commands), check_health=False
            )
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as error:
                    replies.append(error)
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            raise OutcomeUnknown(
                f"no reply from redis, the command may have run: {error}"
            ) from error
        except BaseException:
            # Cancelled while replies were due: they must never reach the next user.
            await connection.disconnect()
            raise
        return replies
    finally:
        await pool.release(connection)


async def _run_on_cluster(client: RedisCluster, commands: Sequence[Command], key: str) -> list[Any]:
    # With an explicit target node redis-py's cluster client does not retry, and its node
    # connections retry nothing either; a MOVED or ASK reply (the command did not run) is
    # still followed. It does not say whether a broken connection had sent the command, so
    # every connection failure counts as unknown here.
    await client.initialize()  # a no-op once the slot table is known
    node = client.get_node_from_key(key)
    replies: list[Any] = []
    for command in commands:
        try:
            replies.append(await client.execute_command(*command, target_nodes=node))
        except ResponseError as error:
            replies.append(error)
        except MaxConnectionsError:
            raise  # no connection was taken: nothing was sent
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            raise OutcomeUnknown(
                f"no reply from redis, the command may have run: {error}"
            ) from error
    return replies
