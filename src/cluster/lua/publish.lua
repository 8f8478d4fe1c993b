-- Number, keep and publish a batch of messages, atomically per message: Redis runs one
-- script at a time, so the PUB/SUB order of a channel is its seq order. One call carries a
-- batch: at one message per call Redis spent 17 µs per publish, at up to 64 per call 10-16
-- µs (docs/BENCHMARKS.md, issue 12).
-- ARGV: history size (0: keep none; trimmed a stream node at a time, so up to 100 more are
-- kept), history TTL in s (0: none), meta TTL in s (0: none), result TTL in s; then per
-- message: data, kind (m|d), a fresh epoch for a channel that has none, and the seq its
-- numbering starts after if it has none (its stored decisions' highest), or -1: then such a
-- message is refused with flag 3 and nothing is done, for the caller to find that seq.
-- KEYS, per message: the channel's meta hash (e = epoch, s = top seq), its history stream,
-- the idempotency result hash ("" when the publish has no key), the PUB/SUB channel.
-- Returns per message {seq, epoch, 1 when answered from the idempotency result else 0}, or
-- {0, error text, 2} for one that failed (the others still ran), or {0, "", 3} (above).
local size, ttl, meta_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local result_ttl = tonumber(ARGV[4])

-- Per channel of this call: its epoch, read once (each redis.call costs about as much as
-- the command it runs).
local epochs = {}
-- The streams of those channels, whose TTLs are renewed once, at the end.
local streams = {}

local function publish(meta, stream, result, pubsub, data, kind, fresh, floor)
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
  return {seq, epoch, 0}
end

local out = {}
for i = 0, #KEYS / 4 - 1 do
  local k, a = i * 4, 4 + i * 4
  local ok, answer = pcall(publish, KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4],
    ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4]))
  if not ok then
    answer = {0, tostring(answer.err or answer), 2}
  end
  out[#out + 1] = answer
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
