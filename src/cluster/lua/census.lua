-- How many sessions each tenant (an org, an API key, a token's user) holds on every node, so
-- that each node can take its part of the tenant's message rate: every node writes its own
-- counts once a second into `{prefix}.census.{node}` (a hash, tenant → sessions, that
-- expires unless written again) and reads everyone's; `{prefix}.census` is the set of nodes.
-- ARGV: the prefix, the node (boot id), the hash's life (ms), then TENANT COUNT pairs.
-- Returns: the number of nodes alive, then each tenant's sessions over them, in order.
local prefix, node, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local nodes = prefix .. ".census"
local function of(n)
  return prefix .. ".census." .. n
end

local tenants = {}
local mine = of(node)
redis.call("del", mine)
-- A field of its own keeps a node without counts alive (and counted among the nodes).
redis.call("hset", mine, "", 0)
for i = 4, #ARGV, 2 do
  tenants[#tenants + 1] = ARGV[i]
  redis.call("hset", mine, ARGV[i], ARGV[i + 1])
end
redis.call("pexpire", mine, ttl)
redis.call("sadd", nodes, node)
redis.call("pexpire", nodes, 10 * ttl)

local totals, alive = {}, 0
for i = 1, #tenants do
  totals[i] = 0
end
for _, other in ipairs(redis.call("smembers", nodes)) do
  if redis.call("exists", of(other)) == 1 then
    alive = alive + 1
    if #tenants > 0 then
      local counts = redis.call("hmget", of(other), unpack(tenants))
      for i = 1, #tenants do
        totals[i] = totals[i] + (tonumber(counts[i]) or 0)
      end
    end
  else
    redis.call("srem", nodes, other)
  end
end
table.insert(totals, 1, alive)
return totals
