-- Take, keep or give back a fan-out worker's lease on one ingest shard.
--
-- KEYS[1] the shard's lease key (in the shard's slot)
-- ARGV[1] the worker (consumer name)   ARGV[2] lease length in ms, 0 to give it back
--
-- Returns 1 when the lease was just taken, 2 when it was ours and is extended,
-- 0 when another worker holds it (or, giving it back, when it was not ours).
local holder = redis.call('GET', KEYS[1])
local ttl = tonumber(ARGV[2])
if ttl == 0 then
  if holder == ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ttl)
  return 2
end
return 0
