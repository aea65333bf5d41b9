-- Delete a feed (a deleted list): drop its history and tell live subscribers.
--
-- KEYS[1] history stream   KEYS[2] meta hash   KEYS[3] post index hash
-- ARGV[1] live channel     ARGV[2] the error frame for its subscribers
-- PUBLISH is defined by store.py: 'SPUBLISH' under Redis Cluster (the channel
-- shares the feed's hash tag, so its shard is the one holding these keys).
--
-- The meta keeps `deleted`, so a post already on its way is not appended.
local stream, meta, index = KEYS[1], KEYS[2], KEYS[3]
redis.call('DEL', stream, index)
redis.call('HSET', meta, 'deleted', '1')
redis.call('HDEL', meta, 'epoch', 'trimmed')
redis.call(PUBLISH, ARGV[1], '! ' .. ARGV[2])
return 1
