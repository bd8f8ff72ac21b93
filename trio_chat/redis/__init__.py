"""Several trio-chat processes as one service, sharing rooms through Redis or a Redis Cluster.

`RedisBroker` (node.py) is the broker of one node: requests, identifiers, heartbeats; its
publishing half is in publishing.py and its receiving half in delivery.py. `RedisSettings`
(settings.py) holds its settings. A room's events travel on the room's own shard channel
(subscriber.py, over the RESP reader of resp.py), numbered and logged by Lua scripts
(scripts.py), in messages described in feed.py.
"""

from trio_chat.redis.node import RedisBroker
from trio_chat.redis.settings import RedisSettings

__all__ = ["RedisBroker", "RedisSettings"]
