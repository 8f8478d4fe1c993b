-- Number, keep and publish one message of a channel, atomically: Redis runs one script at a
-- time, so the PUB/SUB order of a channel is its seq order.
-- KEYS: the channel's meta hash (e = epoch, s = top seq), its history stream, and the
-- idempotency result hash ("" when the publish has no key).
-- ARGV: data, kind (m|d), history size (0: keep none), history TTL in s (0: none), meta TTL
-- in s (0: none), result TTL in s, a fresh epoch for a channel that has none, the PUB/SUB
-- channel.
-- Returns {seq, epoch, 1 when answered from the idempotency result else 0}.
local meta, stream, result = KEYS[1], KEYS[2], KEYS[3]
local data, kind = ARGV[1], ARGV[2]
local size, ttl, meta_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local result_ttl, fresh, pubsub = tonumber(ARGV[6]), ARGV[7], ARGV[8]
if result ~= "" then
  local known = redis.call("hmget", result, "e", "s")
  if known[1] then
    return {tonumber(known[2]), known[1], 1}
  end
end
local epoch = redis.call("hget", meta, "e")
if not epoch then
  -- New, or its meta was lost (Redis restarted with nothing on disk, or evicted it): a new
  -- epoch, and no history from the old one.
  epoch = fresh
  redis.call("hset", meta, "e", epoch)
  redis.call("del", stream)
end
local seq = redis.call("hincrby", meta, "s", 1)
if meta_ttl > 0 then
  redis.call("expire", meta, meta_ttl)
end
local id = string.format("%d", seq)
if size > 0 then
  redis.call("xadd", stream, "MAXLEN", size, id, "d", data, "k", kind)
  if ttl > 0 then
    redis.call("expire", stream, ttl)
  end
end
redis.call("publish", pubsub, id .. ":" .. epoch .. ":" .. kind .. ":" .. data)
if result ~= "" then
  redis.call("hset", result, "e", epoch, "s", seq)
  redis.call("expire", result, result_ttl)
end
return {seq, epoch, 0}
