-- Accept a post onto the ingest stream, once per idempotency key.
--
-- KEYS[1] ingest stream    KEYS[2] idempotency key ('' fields when unused)
-- ARGV[1] author           ARGV[2] post body JSON
-- ARGV[3] idempotency TTL in seconds (0: no key)
--
-- Returns {1, entry id, body} for a new post, {0, entry id, body} for a repeat.
local stream, idem = KEYS[1], KEYS[2]
local author, body, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])

if ttl > 0 then
  local seen = redis.call('HMGET', idem, 'id', 'body')
  if seen[1] then
    return {0, seen[1], seen[2]}
  end
end
local id = redis.call('XADD', stream, '*', 'a', author, 'd', body)
if ttl > 0 then
  redis.call('HSET', idem, 'id', id, 'body', body)
  redis.call('EXPIRE', idem, ttl)
end
return {1, id, body}
