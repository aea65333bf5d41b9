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
local maxlen = tonumber(ARGV[1])
local fresh_epoch = ARGV[2]
local slack = math.max(1, math.floor(maxlen / 10))
local out = {}

local function append_feed(stream, meta, index, channel, feed, first, n)
  local m = redis.call('HMGET', meta, 'deleted', 'epoch')
  if m[1] then
    for _ = 1, n do
      out[#out + 1] = ''
    end
    return
  end
  local epoch = m[2]
  if not epoch then
    epoch = fresh_epoch
    redis.call('HSET', meta, 'epoch', epoch)
  end
  local head = '{"op":"post","feed":"' .. feed .. '","cursor":"' .. epoch .. '.'
  for k = first, first + n - 1 do
    local p = tonumber(ARGV[k])
    local post_id, post_json = ARGV[2 + 2 * p], ARGV[3 + 2 * p]
    if redis.call('HEXISTS', index, post_id) == 1 then
      out[#out + 1] = ''
    else
      local id = redis.call('XADD', stream, '*', 't', 'post', 'pid', post_id, 'p', post_json)
      redis.call('HSET', index, post_id, id)
      -- The live message is "<entry id> <frame>": the gateway orders by the id
      -- and writes the frame bytes as they are.
      redis.call(PUBLISH, channel, id .. ' ' .. head .. id .. '","post":' .. post_json .. '}')
      out[#out + 1] = id
    end
  end

  -- Exact trimming, amortised: once the history exceeds its bound by a tenth,
  -- cut it back and remember the newest trimmed id so resumes can report gaps.
  local len = redis.call('XLEN', stream)
  if len > maxlen + slack then
    local old = redis.call('XRANGE', stream, '-', '+', 'COUNT', len - maxlen)
    for _, entry in ipairs(old) do
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'pid' then
          redis.call('HDEL', index, fields[i + 1])
        end
      end
    end
    redis.call('XTRIM', stream, 'MAXLEN', maxlen)
    redis.call('HSET', meta, 'trimmed', old[#old][1])
  end
end

local arg = 4 + 2 * tonumber(ARGV[3])
for f = 1, #KEYS, 3 do
  local channel, feed, n = ARGV[arg], ARGV[arg + 1], tonumber(ARGV[arg + 2])
  local before = #out
  local ok, err = pcall(append_feed, KEYS[f], KEYS[f + 1], KEYS[f + 2], channel, feed, arg + 3, n)
  if not ok then
    local text = '!' .. (type(err) == 'table' and (err.err or '?') or tostring(err))
    for i = #out + 1, before + n do
      out[i] = text
    end
  end
  arg = arg + 3 + n
end
return out
