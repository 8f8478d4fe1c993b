-- Exclusive sessions across nodes: one lock key per session key, holding its holder's
-- connection id (`{node}-{shard}-{conn}`) with a TTL that the holder's node refreshes.
-- ARGV[1] = "claim": KEYS[1] the lock; ARGV[2] the claiming connection, ARGV[3] TTL in ms,
--   ARGV[4] "replace" or "reject", ARGV[5] the key prefix, ARGV[6] the session key.
--   Returns {1, ""} granted, {2, holder} granted and the holder told to go (a message
--   `{holder} {unix ms} {session key}` on its node's channel `{prefix}.node.{node}`), or
--   {0, holder} refused.
-- ARGV[1] = "release": KEYS[1] the lock; ARGV[2] the connection: freed if it holds it.
-- ARGV[1] = "refresh": KEYS the locks, ARGV[2] TTL in ms, then one holder per lock: each
--   lock still (or again: it expired and nobody took it) held for the TTL. Returns the
--   1-based places of the locks someone else holds now.
local op = ARGV[1]
if op == "claim" then
  local lock, me, ttl, policy = KEYS[1], ARGV[2], ARGV[3], ARGV[4]
  local held = redis.call("get", lock)
  if not held or held == me then
    redis.call("set", lock, me, "PX", ttl)
    return {1, ""}
  end
  if policy == "reject" then
    return {0, held}
  end
  redis.call("set", lock, me, "PX", ttl)
  local node = string.match(held, "^([^-]+)-")
  if node then
    local t = redis.call("time")
    local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call("publish", ARGV[5] .. ".node." .. node, held .. " " .. ms .. " " .. ARGV[6])
  end
  return {2, held}
elseif op == "release" then
  if redis.call("get", KEYS[1]) == ARGV[2] then
    redis.call("del", KEYS[1])
  end
  return 0
elseif op == "refresh" then
  local ttl, lost = ARGV[2], {}
  for i, lock in ipairs(KEYS) do
    local held, me = redis.call("get", lock), ARGV[i + 2]
    if held == me then
      redis.call("pexpire", lock, ttl)
    elseif not held then
      redis.call("set", lock, me, "PX", ttl)
    else
      lost[#lost + 1] = i
    end
  end
  return lost
end
return redis.error_reply("unknown session op " .. tostring(op))
