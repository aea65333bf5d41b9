-- Accept a post and fan it out at once, atomically: what ingest_post.lua and
-- then the fan-out worker's feed_append.lua do, in one call. For a single
-- Redis server only (the feeds' keys are in other Cluster slots than the
-- ingest shard's); the worker then only acknowledges the entry, which says
-- so (`n`: the number of feeds written, for its metrics). A post reaches its readers one round trip after it is sent.
--
-- KEYS[1] ingest stream      KEYS[2] idempotency hash (KEYS[1] again when unused)
-- KEYS[3] post record key prefix (`...:post:`), completed here with the post id
-- KEYS[4] dead-letter stream of the shard
-- KEYS[5] the author's memberships (`member-of` set)
-- then per feed: history stream, meta hash, post index hash
-- ARGV[1] author             ARGV[2] post body JSON        ARGV[3] lists JSON
-- ARGV[4] feeds JSON         ARGV[5] idempotency TTL (0: no key)
-- ARGV[6] record TTL         ARGV[7] shard                 ARGV[8] shard count
-- ARGV[9] max history length ARGV[10] epoch to adopt if a feed has none yet
-- then per feed, in KEYS order: live channel, feed name
--
-- Returns {1, post id, body} for a new post, {0, post id, body} for a repeat,
-- and {-1, lists} without writing anything when ARGV[3] is not the author's
-- lists now (the caller read them before, or remembered them): the feeds
-- passed are then not the ones the post must reach; call again with these.
--! include ingest_accept_core.lua
--! include feed_append_core.lua
local dead = KEYS[4]
local author, body, lists = ARGV[1], ARGV[2], ARGV[3]
local maxlen, fresh_epoch = tonumber(ARGV[9]), ARGV[10]

-- The lists are those of the moment of acceptance, checked here, atomically.
local members = redis.call('SMEMBERS', KEYS[5])
table.sort(members)
local given = cjson.decode(lists)
local same = #given == #members
for i = 1, #members do
  same = same and given[i] == members[i]
end
if not same then
  return {-1, members}
end

local fanned = {'n', string.format('%d', (#KEYS - 5) / 3)}
local reply, entry = accept_post(KEYS[1], KEYS[2], KEYS[3], author, body, lists, ARGV[4],
  tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), fanned)
if not entry then
  return reply  -- a repeat: fanned out when first accepted
end
local post_id = reply[2]
local ms = string.match(post_id, '^(%d+)-')

-- The post as posts.build_post and orjson write it: the body's own fields
-- between the id and author and created_at (a handle needs no escaping).
local post_json = '{"id":"' .. post_id .. '","author":"' .. author .. '",' .. string.sub(body, 2, -2)
  .. ',"created_at":' .. ms .. '}'
local posts = {{post_id, post_json}}
local refused = nil
local out = {}
for f = 6, #KEYS, 3 do
  local arg = 11 + 2 * ((f - 6) / 3)
  local ok, err = pcall(append_feed, out, maxlen, fresh_epoch, KEYS[f], KEYS[f + 1], KEYS[f + 2], ARGV[arg], ARGV[arg + 1], posts)
  if not ok and not refused then
    refused = type(err) == 'table' and (err.err or '?') or tostring(err)
  end
end
if refused then
  -- As the worker does with an entry whose feed writes Redis refuses: the
  -- other feeds have it, the entry goes to the dead letters.
  redis.call('XADD', dead, 'MAXLEN', '~', 10000, '*', 'entry', entry,
    'reason', 'redis refused its feed writes: ' .. refused, 'a', author, 'd', body, 'l', lists, unpack(fanned))
end
return reply
