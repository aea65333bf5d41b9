-- Mark a post deleted and remove it from its feeds at once, atomically: what
-- post_delete.lua and then the fan-out worker's feed_delete.lua do, in one
-- call. For a single Redis server only (the feeds' keys are in other Cluster
-- slots than the ingest shard's). The ingest entry of the delete says so
-- (`n`: the number of feeds that sent a delete item): the worker only
-- acknowledges it. If Redis refuses a feed's writes (a key of the wrong
-- type), the entry goes without `n`, and the worker deletes from the feeds
-- again (each skips what is done) and moves the entry to the dead letters.
--
-- KEYS[1] post record   KEYS[2] ingest stream (same shard)
-- then per feed: history stream, meta hash, post index hash
-- ARGV[1] post id       ARGV[2] the caller's handle, '' for admin
-- ARGV[3] the post's feeds (JSON) as the caller read them from its record
-- ARGV[4] epoch to adopt if a feed has none yet
-- then per feed, in KEYS order: live channel, feed name
--
-- Returns 1 when deleted, 0 when there is no such post (or it is already
-- deleted), -1 when the caller is not its author, and -2 without writing
-- anything when ARGV[3] is not the record's feeds (they are written once, at
-- accept: the record was replaced since the caller read them).
--! include post_delete_core.lua
--! include feed_delete_core.lua
local record, stream = KEYS[1], KEYS[2]
local post_id = ARGV[1]

local feeds = deletable(record, ARGV[2])
if feeds == 0 or feeds == -1 then
  return feeds
end
if feeds ~= ARGV[3] then
  return -2
end
redis.call('HSET', record, 'deleted', '1')
local sent, refused = 0, false
for f = 3, #KEYS, 3 do
  local arg = 5 + 2 * ((f - 3) / 3)
  local ok, id = pcall(delete_from_feed, KEYS[f], KEYS[f + 1], KEYS[f + 2], ARGV[arg], ARGV[arg + 1], post_id, ARGV[4])
  if not ok then
    refused = true
  elseif id then
    sent = sent + 1
  end
end
if refused then
  redis.call('XADD', stream, '*', 'x', post_id, 'f', feeds)
else
  redis.call('XADD', stream, '*', 'x', post_id, 'f', feeds, 'n', string.format('%d', sent))
end
return 1
