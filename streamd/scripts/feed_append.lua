-- Append one post to a feed's history and publish it live, atomically.
--
-- KEYS[1] history stream   KEYS[2] meta hash   KEYS[3] post index hash
-- ARGV[1] live channel     ARGV[2] feed name   ARGV[3] post id
-- ARGV[4] post JSON        ARGV[5] max history length
-- ARGV[6] epoch to adopt if the feed has none yet
-- PUBLISH is defined by store.py: 'SPUBLISH' under Redis Cluster (the channel
-- shares the feed's hash tag, so its shard is the one holding these keys).
--
-- Returns the item's entry id, or false when nothing was appended: the post
-- is already in the feed (a redelivered ingest entry), was deleted before it
-- got here, or the feed itself was deleted (a list).
local stream, meta, index = KEYS[1], KEYS[2], KEYS[3]
local channel, feed, post_id, post_json = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local maxlen = tonumber(ARGV[5])

if redis.call('HEXISTS', index, post_id) == 1 or redis.call('HEXISTS', meta, 'deleted') == 1 then
  return false
end

local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[6]
  redis.call('HSET', meta, 'epoch', epoch)
end

local id = redis.call('XADD', stream, '*', 't', 'post', 'pid', post_id, 'p', post_json)
redis.call('HSET', index, post_id, id)

-- The live message is "<entry id> <frame>": the gateway orders by the id and
-- writes the frame bytes as they are.
local frame = '{"op":"post","feed":"' .. feed .. '","cursor":"' .. epoch .. '.' .. id ..
  '","post":' .. post_json .. '}'
redis.call(PUBLISH, channel, id .. ' ' .. frame)

-- Exact trimming, amortised: once the history exceeds its bound by a tenth,
-- cut it back and remember the newest trimmed id so resumes can report gaps.
local len = redis.call('XLEN', stream)
local slack = math.max(1, math.floor(maxlen / 10))
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
return id
