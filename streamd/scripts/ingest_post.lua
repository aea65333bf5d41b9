-- Accept a post: append it to the ingest stream and keep its record, once per
-- idempotency key. Everything here lives in the ingest shard's slot.
--
-- KEYS[1] ingest stream      KEYS[2] idempotency hash (KEYS[1] again when unused)
-- KEYS[3] post record key prefix (`...:post:`), completed here with the post id
-- ARGV[1] author             ARGV[2] post body JSON        ARGV[3] lists JSON
-- ARGV[4] feeds JSON         ARGV[5] idempotency TTL (0: no key)
-- ARGV[6] record TTL         ARGV[7] shard                 ARGV[8] shard count
--
-- Returns {1, post id, body} for a new post, {0, post id, body} for a repeat.
local stream, idem, record_prefix = KEYS[1], KEYS[2], KEYS[3]
local author, body, lists, feeds = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local idem_ttl, record_ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local shard, shards = tonumber(ARGV[7]), tonumber(ARGV[8])

if idem_ttl > 0 then
  local seen = redis.call('HMGET', idem, 'id', 'body')
  if seen[1] then
    return {0, seen[1], seen[2]}
  end
end

local entry = redis.call('XADD', stream, '*', 'a', author, 'd', body, 'l', lists)
-- Post ids stay unique across shards: the sequence part encodes the shard.
local ms, seq = string.match(entry, '^(%d+)-(%d+)$')
local post_id = ms .. '-' .. string.format('%d', tonumber(seq) * shards + shard)

local record = record_prefix .. post_id
redis.call('HSET', record, 'a', author, 'd', body, 'f', feeds)
redis.call('EXPIRE', record, record_ttl)
if idem_ttl > 0 then
  redis.call('HSET', idem, 'id', post_id, 'body', body)
  redis.call('EXPIRE', idem, idem_ttl)
end
return {1, post_id, body}
