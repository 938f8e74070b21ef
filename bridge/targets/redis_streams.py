"""Target: Redis Streams. XADD of each event to a stream (a template), trimmed to about `maxlen`
entries, with the event id as a field. Redis has no message ids of its own to de-duplicate on, so
a small Lua script makes the add conditional: it sets `{stream}:seen:{event id}` (NX, expiring
after `dedup`) and adds the entry only when that key was new, atomically (docs/brokers.md).
"""

from __future__ import annotations

import redis.asyncio
import redis.exceptions
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.retry import Retry

from bridge.config import RedisTargetConfig
from bridge.errors import DeliveryError
from bridge.models import OutboxItem
from bridge.targets.broker import JSON, STRUCTURED, BrokerTarget, attributes, data_bytes

# KEYS: stream, seen-key. ARGV: dedup seconds (0: off), maxlen (0: unbounded), then field/value
# pairs. Returns the new entry's id, or false when the event was added within the dedup window.
ADD = """
local ttl = tonumber(ARGV[1])
if ttl > 0 and not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ttl) then
  return false
end
local args = {KEYS[1]}
local maxlen = tonumber(ARGV[2])
if maxlen > 0 then
  table.insert(args, 'MAXLEN')
  table.insert(args, '~')
  table.insert(args, maxlen)
end
table.insert(args, '*')
for i = 3, #ARGV do
  table.insert(args, ARGV[i])
end
return redis.call('XADD', unpack(args))
"""


class RedisTarget(BrokerTarget[tuple[redis.asyncio.Redis, AsyncScript]]):
    def __init__(self, name: str, config: RedisTargetConfig) -> None:
        super().__init__(name, config, config.stream, "redis")
        self._config = config
        self._ttl = max(1, round(config.dedup)) if config.dedup > 0 else 0

    async def _connect(self) -> tuple[redis.asyncio.Redis, AsyncScript]:
        client = redis.asyncio.Redis.from_url(
            self._config.redis,
            socket_timeout=self._config.timeout,
            socket_connect_timeout=self._config.timeout,
            # One immediate retry on a fresh connection (a pooled one the server closed); more
            # is the outbox's job, with its backoff.
            retry=Retry(NoBackoff(), 1),
            client_name="mj-bridge",
        )
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        return client, client.register_script(ADD)

    async def _disconnect(self, link: tuple[redis.asyncio.Redis, AsyncScript]) -> None:
        await link[0].aclose()

    def fields(self, item: OutboxItem) -> list[str | bytes]:
        """The entry: `id`, `type`, `subject`, then `event` (the CloudEvents JSON; binary mode:
        `data` and each attribute as a field of its own)."""
        attrs = attributes(item)
        if self.binary:
            pairs: list[str | bytes] = [x for k, v in attrs.items() for x in (k, v)]
            return [*pairs, "datacontenttype", JSON, "data", data_bytes(item)]
        return [
            "id",
            item.event_id,
            "type",
            attrs["type"],
            "subject",
            attrs.get("subject", ""),
            "datacontenttype",
            STRUCTURED,
            "event",
            item.payload,
        ]

    async def send(self, item: OutboxItem) -> None:
        stream = self.destination(item)
        link = await self.link.get()
        _, add = link
        args = [self._ttl, self._config.maxlen, *self.fields(item)]
        try:
            await add(keys=[stream, f"{stream}:seen:{item.event_id}"], args=args)
        except redis.exceptions.ResponseError as exc:
            # WRONGTYPE (the key is no stream), OOM, NOSCRIPT after a flush: not for a new
            # connection to fix, but possibly for the operator: kept and retried.
            raise self.link.error("Redis refused the entry", exc, retryable=True) from exc
        except (redis.exceptions.TimeoutError, TimeoutError) as exc:
            raise DeliveryError(
                f"{self.name}: no answer from Redis within {self._config.timeout:g}s",
                retryable=True,
            ) from exc
        except (redis.exceptions.RedisError, OSError) as exc:
            await self.link.drop(link)
            raise self.link.error("XADD failed", exc, retryable=True) from exc
