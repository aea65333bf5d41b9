-- Remove a post from a feed's history and send a `delete` item, atomically.
--
-- KEYS[1] history stream   KEYS[2] meta hash   KEYS[3] post index hash
-- ARGV[1] live channel     ARGV[2] feed name   ARGV[3] post id
-- ARGV[4] epoch to adopt if the feed has none yet
-- PUBLISH is defined by store.py: 'SPUBLISH' under Redis Cluster (the channel
-- shares the feed's hash tag, so its shard is the one holding these keys).
--
-- The index keeps "x" for a deleted post, so a redelivered delete sends
-- nothing twice and a post append arriving after its delete is skipped.
-- Returns the delete item's entry id, or false when nothing was sent.
local stream, meta, index = KEYS[1], KEYS[2], KEYS[3]
local channel, feed, post_id = ARGV[1], ARGV[2], ARGV[3]

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
  epoch = ARGV[4]
  redis.call('HSET', meta, 'epoch', epoch)
end
local id = redis.call('XADD', stream, '*', 't', 'delete', 'pid', post_id)
local frame = '{"op":"delete","feed":"' .. feed .. '","cursor":"' .. epoch .. '.' .. id ..
  '","post_id":"' .. post_id .. '"}'
redis.call(PUBLISH, channel, id .. ' ' .. frame)
return id
