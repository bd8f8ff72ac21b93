"""Several trio-chat processes as one service, sharing rooms through Redis or a Redis Cluster.

`RedisBroker` (node.py) is the broker of one node; `RedisSettings` (settings.py) its settings.
A room's events travel on the room's own shard channel (subscriber.py), numbered and logged
by Lua scripts (scripts.py) in messages described in feed.py.
"""

from trio_chat.redis.node import RedisBroker
from trio_chat.redis.settings import RedisSettings

__all__ = ["RedisBroker", "RedisSettings"]
