-- Mark a post deleted and queue its delete for the fan-out worker.
--
-- KEYS[1] post record   KEYS[2] ingest stream (same shard)
-- ARGV[1] post id       ARGV[2] the caller's handle, '' for admin
--
-- Returns 1 when queued, 0 when there is no such post (or it is already
-- deleted), -1 when the caller is not its author.
local record, stream = KEYS[1], KEYS[2]
local post_id, caller = ARGV[1], ARGV[2]

local rec = redis.call('HMGET', record, 'a', 'f', 'deleted')
if not rec[1] or rec[3] then
  return 0
end
if caller ~= '' and caller ~= rec[1] then
  return -1
end
redis.call('HSET', record, 'deleted', '1')
redis.call('XADD', stream, '*', 'x', post_id, 'f', rec[2])
return 1
