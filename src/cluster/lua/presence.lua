-- A channel's presence across nodes, after centrifuge's presence_add/presence_rem/presence_get
-- (Redis 7.0 has no per-field expiry): a hash of members, a sorted set of their expiry times,
-- a sorted set of their ids for paging, a hash of connections per user. Every call first
-- removes the members whose node stopped refreshing them, telling the channel LEAVE.
-- KEYS: the members hash, the expiry set, the paging set, the users hash, the PUB/SUB channel.
-- ARGV[1] = "set": ARGV[2] TTL in ms, ARGV[3] the calling node, then (id, member) pairs: each
--   member kept (or refreshed) for the TTL; a new one is told as JOIN, a changed one as STATUS.
-- ARGV[1] = "rem": ARGV[2] the calling node, then ids: each one present is told as LEAVE.
-- ARGV[1] = "get": ARGV[2] the id after which to start ("" from the first), ARGV[3] the most
--   members: returns {members, users, page, the last id of the page or "" when it is the end}.
-- A member is `status ulen:user clen:connection meta` (see keys.rs); PUB/SUB messages are
-- `p:{j|l|s}:{node}:{member}`, node "-" for an expiry (every node tells it).
local data, expiry, ids, users, channel = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function user_of(member)
  local n = string.match(member, "^.(%d+):")
  if not n then
    return ""
  end
  local start = 3 + #n
  return string.sub(member, start, start + tonumber(n) - 1)
end

local function forget(id, node)
  local member = redis.call("hget", data, id)
  redis.call("zrem", expiry, id)
  redis.call("zrem", ids, id)
  if not member then
    return
  end
  redis.call("hdel", data, id)
  local user = user_of(member)
  if redis.call("hincrby", users, user, -1) <= 0 then
    redis.call("hdel", users, user)
  end
  redis.call("publish", channel, "p:l:" .. node .. ":" .. member)
end

-- At most 1,000 a call, so that one call holds Redis for a bounded time; the next cleans on.
for _, id in ipairs(redis.call("zrangebyscore", expiry, "-inf", now, "LIMIT", 0, 1000)) do
  forget(id, "-")
end

local op = ARGV[1]
if op == "set" then
  local ttl, node = tonumber(ARGV[2]), ARGV[3]
  for i = 4, #ARGV - 1, 2 do
    local id, member = ARGV[i], ARGV[i + 1]
    local old = redis.call("hget", data, id)
    if old ~= member then
      redis.call("hset", data, id, member)
    end
    redis.call("zadd", expiry, now + ttl, id)
    if not old then
      redis.call("zadd", ids, 0, id)
      redis.call("hincrby", users, user_of(member), 1)
      redis.call("publish", channel, "p:j:" .. node .. ":" .. member)
    elseif old ~= member then
      redis.call("publish", channel, "p:s:" .. node .. ":" .. member)
    end
  end
  -- Abandoned channels go too (not before a minute: members expire one by one, with LEAVE).
  for _, key in ipairs({data, expiry, ids, users}) do
    redis.call("pexpire", key, math.max(ttl * 2, 60000))
  end
  return 0
elseif op == "rem" then
  local node = ARGV[2]
  for i = 3, #ARGV do
    forget(ARGV[i], node)
  end
  return 0
elseif op == "get" then
  local after, max = ARGV[2], tonumber(ARGV[3])
  local from = "-"
  if after ~= "" then
    from = "(" .. after
  end
  local page = redis.call("zrangebylex", ids, from, "+", "LIMIT", 0, max + 1)
  local last = ""
  if #page > max then
    page[#page] = nil
    last = page[#page] or ""
  end
  local members = {}
  if #page > 0 then
    for _, member in ipairs(redis.call("hmget", data, unpack(page))) do
      if member then
        members[#members + 1] = member
      end
    end
  end
  return {redis.call("hlen", data), redis.call("hlen", users), members, last}
end
return redis.error_reply("unknown presence op " .. tostring(op))
