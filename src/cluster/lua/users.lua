-- Where users are connected, and what is kept for them meanwhile (`publish.lua` keeps it).
-- `{prefix}.online.{user}`: hash, node → until when (unix ms) it has connections of the
-- user; `{prefix}.queue.{user}`: list, oldest first, of `seq\ncreated\nexpires\norg\n
-- channel\ndata`; `{prefix}.queued`: hash, user → bytes kept, `*` → all users' bytes;
-- `{prefix}.queues`: zset, user → when the oldest of its kept messages expires (at most).
-- ARGV: op, the prefix of users' keys (`{prefix}.`), the node (boot id), now (unix ms), until
-- (unix ms), then:
--   on USER: the node has connections of USER (until then): returns what was kept for
--     USER (and forgets it), in one call with the mark, so that a message to USER is
--     either kept and in this answer, or told to every node after it;
--   off USER...: the node has no more connections of these users;
--   refresh USER...: the node still has connections of these users (until then); and up
--     to 64 users' expired kept messages are dropped: returns how many;
--   read USER ORG: what is kept for USER (sent by ORG, or all when "");
--   clear USER ORG: drop it: returns what was dropped;
--   back USER ENTRY...: keep these again, before what is kept (they were taken for a
--     connection gone before they reached it).
local op, users, node, now, till = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local sizes, due = users .. "queued", users .. "queues"
local ONLINE_TTL_MS = 2 * (tonumber(till) - now)

local function online(user)
  return users .. "online." .. user
end

local function mark(user)
  redis.call("hset", online(user), node, till)
  redis.call("pexpire", online(user), ONLINE_TTL_MS)
end

-- The entry's expiry and org.
local function fields(entry)
  local expires, org = string.match(entry, "^%d+\n%d+\n(%d+)\n([^\n]*)\n")
  return tonumber(expires), org
end

-- Replace USER's kept messages by `kept` (its bytes accounted).
local function replace(user, kept)
  local queue = users .. "queue." .. user
  local before = tonumber(redis.call("hget", sizes, user)) or 0
  redis.call("del", queue)
  local bytes, first = 0, nil
  for _, entry in ipairs(kept) do
    redis.call("rpush", queue, entry)
    bytes = bytes + #entry
    first = first or fields(entry)
  end
  redis.call("hincrby", sizes, "*", bytes - before)
  if #kept == 0 then
    redis.call("hdel", sizes, user)
    redis.call("zrem", due, user)
  else
    redis.call("hset", sizes, user, bytes)
    redis.call("zadd", due, first, user)
  end
end

if op == "on" then
  local user = ARGV[6]
  mark(user)
  local queue = users .. "queue." .. user
  local kept = redis.call("lrange", queue, 0, -1)
  if #kept > 0 then
    replace(user, {})
  end
  return kept
elseif op == "off" then
  for i = 6, #ARGV do
    redis.call("hdel", online(ARGV[i]), node)
  end
  return 0
elseif op == "refresh" then
  for i = 6, #ARGV do
    mark(ARGV[i])
  end
  local expired = 0
  for _, user in ipairs(redis.call("zrangebyscore", due, "-inf", now, "LIMIT", 0, 64)) do
    local kept = {}
    for _, entry in ipairs(redis.call("lrange", users .. "queue." .. user, 0, -1)) do
      if fields(entry) > now then
        kept[#kept + 1] = entry
      else
        expired = expired + 1
      end
    end
    replace(user, kept)
  end
  return expired
elseif op == "read" or op == "clear" then
  local user, org = ARGV[6], ARGV[7]
  local all = redis.call("lrange", users .. "queue." .. user, 0, -1)
  local mine, others = {}, {}
  for _, entry in ipairs(all) do
    local expires, by = fields(entry)
    if expires > now and (org == "" or by == org) then
      mine[#mine + 1] = entry
    elseif expires > now then
      others[#others + 1] = entry
    end
  end
  if op == "read" then
    return mine
  end
  replace(user, others)
  return mine
end
if op == "back" then
  local user = ARGV[6]
  local kept = {}
  for i = 7, #ARGV do
    kept[#kept + 1] = ARGV[i]
  end
  for _, entry in ipairs(redis.call("lrange", users .. "queue." .. user, 0, -1)) do
    kept[#kept + 1] = entry
  end
  replace(user, kept)
  return 0
end
return redis.error_reply("unknown op " .. tostring(op))
