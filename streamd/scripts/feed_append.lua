-- Append posts to feeds' histories and publish them live, atomically.
--
-- One call carries a batch's posts for any number of feeds whose keys share
-- one slot (under Redis Cluster the worker groups feeds by slot; a single
-- server takes them all in one call):
--
-- KEYS    per feed, in order: history stream, meta hash, post index hash
-- ARGV[1] max history length   ARGV[2] epoch to adopt if a feed has none yet
-- ARGV[3] P, the number of posts, then P pairs: post id, post JSON
-- then per feed, in KEYS order: live channel, feed name, n, then n post
-- numbers (1..P) in the order the posts were accepted.
-- PUBLISH is defined by store.py: 'SPUBLISH' under Redis Cluster (the channel
-- shares the feed's hash tag, so its shard is the one holding these keys).
--
-- Returns one reply per (feed, post), in ARGV order: the item's entry id;
-- '' when nothing was appended (the post is already in the feed: a
-- redelivered ingest entry; it was deleted before it got here; or the feed
-- itself was deleted: a list); '!<error>' when Redis refused the feed's
-- writes (a key of the wrong type): the feed's remaining items get it too,
-- and the other feeds go on.
--! include feed_append_core.lua
local maxlen = tonumber(ARGV[1])
local fresh_epoch = ARGV[2]
local out = {}

local arg = 4 + 2 * tonumber(ARGV[3])
for f = 1, #KEYS, 3 do
  local channel, feed, n = ARGV[arg], ARGV[arg + 1], tonumber(ARGV[arg + 2])
  local posts = {}
  for k = arg + 3, arg + 2 + n do
    local p = tonumber(ARGV[k])
    posts[#posts + 1] = {ARGV[2 + 2 * p], ARGV[3 + 2 * p]}
  end
  local before = #out
  local ok, err = pcall(append_feed, out, maxlen, fresh_epoch, KEYS[f], KEYS[f + 1], KEYS[f + 2], channel, feed, posts)
  if not ok then
    local text = '!' .. (type(err) == 'table' and (err.err or '?') or tostring(err))
    for i = #out + 1, before + n do
      out[i] = text
    end
  end
  arg = arg + 3 + n
end
return out
