-- Included by feed_delete.lua and post_delete_fanout.lua (see feed_append_core.lua).
--
-- delete_from_feed removes a post from one feed's history and sends a
-- `delete` item, atomically. The index keeps "x" for a deleted post, so a
-- redelivered delete sends nothing twice and a post append arriving after
-- its delete is skipped. Returns the delete item's entry id, or false when
-- nothing was sent. Errors (a key of the wrong type) are raised.
local function delete_from_feed(stream, meta, index, channel, feed, post_id, fresh_epoch)
  local at = redis.call('HGET', index, post_id)
  if at == 'x' or redis.call('HEXISTS', meta, 'deleted') == 1 then
    return false
  end
  redis.call('HSET', index, post_id, 'x')
  if at then
    redis.call('XDEL', stream, at)
  end
  -- Sent even when the post is not (or no longer) in the history: a client may
  -- hold it, and the item carries the tombstone's pid so trimming drops both.

  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = fresh_epoch
    redis.call('HSET', meta, 'epoch', epoch)
  end
  local id = redis.call('XADD', stream, '*', 't', 'delete', 'pid', post_id)
  local frame = '{"op":"delete","feed":"' .. feed .. '","cursor":"' .. epoch .. '.' .. id ..
    '","post_id":"' .. post_id .. '"}'
  redis.call(PUBLISH, channel, id .. ' ' .. frame)
  return id
end
