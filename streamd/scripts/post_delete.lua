-- Mark a post deleted and queue its delete for the fan-out worker.
--
-- KEYS[1] post record   KEYS[2] ingest stream (same shard)
-- ARGV[1] post id       ARGV[2] the caller's handle, '' for admin
--
-- Returns 1 when queued, 0 when there is no such post (or it is already
-- deleted), -1 when the caller is not its author.
--! include post_delete_core.lua
local record, stream = KEYS[1], KEYS[2]
local post_id = ARGV[1]

local feeds = deletable(record, ARGV[2])
if feeds == 0 or feeds == -1 then
  return feeds
end
redis.call('HSET', record, 'deleted', '1')
redis.call('XADD', stream, '*', 'x', post_id, 'f', feeds)
return 1
