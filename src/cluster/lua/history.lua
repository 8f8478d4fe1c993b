-- A channel's history after a seq, with its top seq and epoch.
-- KEYS: the channel's meta hash and its history stream.
-- ARGV: the first seq wanted, the most entries to return (0: only the top and epoch), a fresh
-- epoch for a channel that has none, meta TTL in s (0: none).
-- The epoch is made here too, so that a client that read the history of an empty channel
-- learns if its meta is lost later.
-- Returns {top, epoch, entries as XRANGE gives them}.
local meta, stream = KEYS[1], KEYS[2]
local from, count, fresh, meta_ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local state = redis.call("hmget", meta, "e", "s")
local epoch, top = state[1], tonumber(state[2] or "0")
if not epoch then
  epoch = fresh
  redis.call("hset", meta, "e", epoch)
  redis.call("del", stream)
  if meta_ttl > 0 then
    redis.call("expire", meta, meta_ttl)
  end
end
local entries = {}
if count > 0 then
  entries = redis.call("xrange", stream, from, "+", "COUNT", count)
end
return {top, epoch, entries}
