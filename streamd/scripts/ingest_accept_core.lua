-- Included by ingest_post.lua and ingest_fanout.lua (see feed_append_core.lua).
--
-- accept_post keeps a post once per idempotency key: the ingest stream entry
-- (author `a`, body `d`, lists `l`, then `marks`, more field-value pairs), the
-- post record and the idempotency hash, all in the ingest shard's slot.
-- Returns a repeat's {0, post id, body}, or a new post's {1, post id, body}
-- and its entry id.
local function accept_post(stream, idem, record_prefix, author, body, lists, feeds,
                           idem_ttl, record_ttl, shard, shards, marks)
  if idem_ttl > 0 then
    local seen = redis.call('HMGET', idem, 'id', 'body')
    if seen[1] then
      return {0, seen[1], seen[2]}, nil
    end
  end

  local entry = redis.call('XADD', stream, '*', 'a', author, 'd', body, 'l', lists, unpack(marks))
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
  return {1, post_id, body}, entry
end
