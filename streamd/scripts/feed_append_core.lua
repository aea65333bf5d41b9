-- Included by feed_append.lua and ingest_fanout.lua (store.py puts it where
-- a script says `--! include feed_append_core.lua`).
--
-- append_feed appends posts to one feed's history and publishes each live,
-- skipping a post already in the feed and every post of a deleted feed.
-- posts: a list of {post id, post JSON}, in the order the posts were
-- accepted. Adds one reply per post to `out`: the item's entry id, or ''
-- when nothing was appended. Errors (a key of the wrong type) are raised:
-- the caller runs it under pcall.
local function append_feed(out, maxlen, fresh_epoch, stream, meta, index, channel, feed, posts)
  local m = redis.call('HMGET', meta, 'deleted', 'epoch')
  if m[1] then
    for _ = 1, #posts do
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
  for _, post in ipairs(posts) do
    local post_id, post_json = post[1], post[2]
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
end
