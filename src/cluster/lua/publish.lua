-- Number, keep and publish a batch of messages, atomically per message: Redis runs one
-- script at a time, so the PUB/SUB order of a channel is its seq order. One call carries a
-- batch: at one message per call Redis spent 17 µs per publish, at up to 64 per call 10-16
-- µs (docs/BENCHMARKS.md, issue 12).
-- ARGV: history size (0: keep none; trimmed a stream node at a time, so up to 100 more are
-- kept), history TTL in s (0: none), meta TTL in s (0: none), result TTL in s; for messages
-- to users: the control channel, the prefix of users' keys (`{prefix}.`), now (unix ms),
-- and the bounds of what is kept for users not connected (messages and bytes per user,
-- bytes for all users); then per message: data, kind (m|d, or u: a message to a user), a
-- fresh epoch for a channel that has none, and the seq its numbering starts after if it has
-- none (its stored decisions' highest), or -1: then such a message is refused with flag 3
-- and nothing is done, for the caller to find that seq; and after a message to a user
-- only (the others pay for no more arguments): the user, the control message that tells
-- every node (its text before and after the seq), and what to keep while the user is
-- connected nowhere (after its seq; "": keep nothing).
-- KEYS, per message: the channel's meta hash (e = epoch, s = top seq), its history stream,
-- the idempotency result hash ("" when the publish has no key), the PUB/SUB channel.
-- Returns per message {seq, epoch, 1 when answered from the idempotency result else 0}, or
-- {0, error text, 2} for one that failed (the others still ran), or {0, "", 3} (above); a
-- message to a user numbered now has {seq, epoch, 0, reach, dropped}: reach is how many
-- nodes heard its control message, or -1 when it was kept (dropped: how many older ones
-- made room), -2 when it was not (too much kept already).
local size, ttl, meta_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local result_ttl = tonumber(ARGV[4])
local control, users, now = ARGV[5], ARGV[6], tonumber(ARGV[7])
local max_messages, max_bytes, max_total = tonumber(ARGV[8]), tonumber(ARGV[9]),
  tonumber(ARGV[10])
local FIRST = 10

-- Per channel of this call: its epoch, read once (each redis.call costs about as much as
-- the command it runs).
local epochs = {}
-- The streams of those channels, whose TTLs are renewed once, at the end.
local streams = {}

-- Keep `entry` (seq, then what the caller made) for `user`, within the bounds: the oldest
-- go first; nothing is kept past the bound for all users.
local function keep(user, entry)
  local queue, sizes = users .. "queue." .. user, users .. "queued"
  local total = tonumber(redis.call("hget", sizes, "*")) or 0
  if #entry > max_bytes or total + #entry > max_total then
    return -2, 0
  end
  redis.call("rpush", queue, entry)
  local bytes = redis.call("hincrby", sizes, user, #entry)
  local count = redis.call("llen", queue)
  local freed, dropped = 0, 0
  while count > max_messages or bytes > max_bytes do
    local old = redis.call("lpop", queue)
    bytes, freed = bytes - #old, freed + #old
    count, dropped = count - 1, dropped + 1
  end
  if freed > 0 then
    redis.call("hincrby", sizes, user, -freed)
  end
  redis.call("hincrby", sizes, "*", #entry - freed)
  -- When the sweep looks at this user's oldest next (the entry's third line).
  local expires = string.match(entry, "^%d+\n%d+\n(%d+)\n")
  redis.call("zadd", users .. "queues", "NX", expires, user)
  return -1, dropped
end

-- A message numbered `seq` for `user`: told to every node while the user is connected to
-- one (or when nothing is to be kept), else kept.
local function to_user(user, seq, head, tail, entry)
  local online = users .. "online." .. user
  local nodes = redis.call("hgetall", online)
  local connected = false
  for i = 1, #nodes, 2 do
    if tonumber(nodes[i + 1]) > now then
      connected = true
    else
      redis.call("hdel", online, nodes[i])
    end
  end
  if connected or entry == "" then
    return redis.call("publish", control, head .. seq .. tail), 0
  end
  return keep(user, seq .. "\n" .. entry)
end

local function publish(meta, stream, result, pubsub, data, kind, fresh, floor, send)
  if result ~= "" then
    local known = redis.call("hmget", result, "e", "s")
    if known[1] then
      return {tonumber(known[2]), known[1], 1}
    end
  end
  local epoch = epochs[meta]
  if not epoch then
    local state = redis.call("hmget", meta, "e", "s")
    epoch = state[1]
    if not state[2] then
      -- No numbering: new, or its meta was lost (Redis restarted with nothing on disk, or
      -- evicted it). It goes on from where the stored decisions leave it, so that their
      -- seqs stay unique. A history read may have made its epoch already (subscribers
      -- hold it); otherwise a new one, and no history from the old one.
      if floor < 0 then
        return {0, "", 3}
      end
      if not epoch then
        epoch = fresh
        redis.call("hset", meta, "e", epoch)
        redis.call("del", stream)
      end
      redis.call("hset", meta, "s", floor)
    end
    epochs[meta] = epoch
    streams[meta] = stream
  end
  local seq = redis.call("hincrby", meta, "s", 1)
  local id = string.format("%d", seq)
  if size > 0 then
    redis.call("xadd", stream, "MAXLEN", "~", size, id, "d", data, "k", kind)
  end
  redis.call("publish", pubsub, id .. ":" .. epoch .. ":" .. kind .. ":" .. data)
  if result ~= "" then
    redis.call("hset", result, "e", epoch, "s", seq)
    redis.call("expire", result, result_ttl)
  end
  if not send then
    return {seq, epoch, 0}
  end
  local reach, dropped = to_user(send[1], id, send[2], send[3], send[4])
  return {seq, epoch, 0, reach, dropped}
end

local out = {}
local a = FIRST
for i = 0, #KEYS / 4 - 1 do
  local k, kind, send = i * 4, ARGV[a + 2], nil
  if kind == "u" then
    kind, send = "m", {ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8]}
  end
  local ok, answer = pcall(publish, KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4],
    ARGV[a + 1], kind, ARGV[a + 3], tonumber(ARGV[a + 4]), send)
  if not ok then
    answer = {0, tostring(answer.err or answer), 2}
  end
  out[#out + 1] = answer
  a = a + (send and 8 or 4)
end
for meta, stream in pairs(streams) do
  if meta_ttl > 0 then
    redis.pcall("expire", meta, meta_ttl)
  end
  if size > 0 and ttl > 0 then
    redis.pcall("expire", stream, ttl)
  end
end
return out
