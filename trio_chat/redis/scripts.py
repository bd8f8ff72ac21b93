"""The Lua scripts a node runs in Redis, and the keys they touch.

Every key of one room carries the room's hash tag (``{room:7}``), and so does the room's
shard channel, so a room's script touches a single slot: it runs on one shard of a Redis
Cluster without CROSSSLOT errors. The identifier counters share the tag ``{ids}``.

A room's events pass through `ROOMS_APPEND`, which in one atomic step gives them the room's
next sequence number, appends them to the room's bounded log (a stream whose entry IDs are the
sequence numbers), updates the room's membership records and publishes them on the room's
channel. A subscriber that sees a gap in the numbers, or lost its subscription, reads what it
missed from the log. The room's epoch, a random string set when its sequence starts, tells a
subscriber that Redis lost the room's history (a restart with no data, a failover to a replica
that had not caught up) and numbering started again.
"""

from __future__ import annotations

# Shared by the scripts that publish. `publish` appends one message to a room's log and
# publishes it on the room's channel, starting the room's epoch (ARGV `new_epoch`) if it has
# none; it returns ``<epoch> <seq>``.
_PUBLISH = """
local function publish(meta, log, channel, new_epoch, maxlen, body)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = new_epoch
    redis.call('HSET', meta, 'epoch', epoch)
    redis.call('DEL', log)
  end
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  local message = epoch .. ' ' .. seq .. '\\n' .. body
  redis.call('XADD', log, 'MAXLEN', '~', maxlen, seq .. '-0', 'm', message)
  redis.call('SPUBLISH', channel, message)
  return epoch .. ' ' .. seq
end
"""

# One node's batches for one or more rooms: per room, three KEYS (`Keys.room`) and the ARGV
# channel, an epoch to start with, the log's length, the body (origin, number, frames), the
# count of membership values to set then those field/record pairs, the count of fields to
# delete then those fields. Returns ``<epoch> <seq>`` per room. A single Redis takes a whole
# batch in one call; a cluster one call per room, as a script may touch one slot only.
ROOMS_APPEND = (
    _PUBLISH
    + """
local results = {}
local a = 1
for k = 1, #KEYS, 3 do
  local n = tonumber(ARGV[a + 4])
  for i = a + 5, a + 4 + n, 2 do redis.call('HSET', KEYS[k + 2], ARGV[i], ARGV[i + 1]) end
  local m = tonumber(ARGV[a + 5 + n])
  for i = a + 6 + n, a + 5 + n + m do redis.call('HDEL', KEYS[k + 2], ARGV[i]) end
  local reply = publish(KEYS[k], KEYS[k + 1], ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
  table.insert(results, reply)
  a = a + 6 + n + m
end
return results
"""
)

# The departures of a dead node's members of one room. KEYS as above; ARGV the channel, an
# epoch, the log's length, the dead node's id. Each of its records holds the leave frame to
# publish. Publishes them in the order the node's connections began, as one message that no
# node's batch numbering covers, so that a second reaper finds nothing.
ROOM_REAP = (
    _PUBLISH
    + """
local prefix = ARGV[4] .. ':'
local found = {}
local records = redis.call('HGETALL', KEYS[3])
for i = 1, #records, 2 do
  if string.sub(records[i], 1, #prefix) == prefix then
    table.insert(found, {tonumber(string.sub(records[i], #prefix + 1)), records[i], records[i + 1]})
  end
end
if #found == 0 then return 0 end
table.sort(found, function(a, b) return a[1] < b[1] end)
local frames = {}
for _, record in ipairs(found) do
  redis.call('HDEL', KEYS[3], record[2])
  table.insert(frames, record[3])
end
local body = 'reaped:' .. ARGV[4] .. ' 0\\n' .. table.concat(frames)
return publish(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], body)
"""
)

# The ROOM_REF of a room name, allocated on first use. ARGV: name, epoch, the lowest ROOM_REF
# this node may be given (one past the highest it has seen). -1 when the epoch is not the
# node's: Redis lost its data and the node must restore what it knows first.
ROOM_REF = """
if redis.call('GET', KEYS[3]) ~= ARGV[2] then return -1 end
local ref = redis.call('HGET', KEYS[1], ARGV[1])
if ref then return tonumber(ref) end
ref = redis.call('INCR', KEYS[2]) - 1
if ref < tonumber(ARGV[3]) then
  ref = tonumber(ARGV[3])
  redis.call('SET', KEYS[2], ref + 1)
end
redis.call('HSET', KEYS[1], ARGV[1], ref)
return ref
"""

# A new JOIN_ID, never below ARGV[2]; -1 on an epoch mismatch as above.
JOIN_ID = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local id = redis.call('INCR', KEYS[1]) - 1
if id < tonumber(ARGV[2]) then
  id = tonumber(ARGV[2])
  redis.call('SET', KEYS[1], id + 1)
end
return id
"""

# Restores identifiers after Redis lost them (or starts a new Redis): the epoch, the
# counters' floors, then the room names (ARGV[4..], name/ref pairs) this node knows.
RESTORE = """
redis.call('SET', KEYS[3], ARGV[1], 'NX')
for i = 1, 2 do
  local floor = tonumber(ARGV[1 + i])
  if tonumber(redis.call('GET', KEYS[i]) or '0') < floor then
    redis.call('SET', KEYS[i], floor)
  end
end
for i = 4, #ARGV, 2 do redis.call('HSETNX', KEYS[4], ARGV[i], ARGV[i + 1]) end
return redis.call('GET', KEYS[3])
"""


class Keys:
    """The names of every key and channel of one service (`prefix` namespaces them)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        ids = f"{prefix}:{{ids}}"
        self.room_refs = f"{ids}:rooms"
        self.room_counter = f"{ids}:room-ref"
        self.join_counter = f"{ids}:join-id"
        self.ids_epoch = f"{ids}:epoch"
        self.nodes = f"{prefix}:nodes"
        self.control = f"{prefix}:{{control}}"
        """The channel of service-wide messages (KILL_SERVICE), which every node receives."""

    def channel(self, room_ref: int) -> str:
        """The shard channel of one room."""
        return f"{self.prefix}:{{room:{room_ref}}}"

    def room(self, room_ref: int) -> list[str]:
        """The room's hash (epoch, seq), its log and its membership records, in script order."""
        tag = self.channel(room_ref)
        return [f"{tag}:seq", f"{tag}:log", f"{tag}:members"]

    def heartbeat(self, node: str) -> str:
        """Exists while the node is alive (it expires)."""
        return f"{self.prefix}:node:{node}"

    def node_rooms(self, node: str) -> str:
        """The rooms where the node may have members: where to look when it dies."""
        return f"{self.prefix}:node-rooms:{node}"
