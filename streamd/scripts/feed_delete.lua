-- Remove a post from a feed's history and send a `delete` item, atomically.
--
-- KEYS[1] history stream   KEYS[2] meta hash   KEYS[3] post index hash
-- ARGV[1] live channel     ARGV[2] feed name   ARGV[3] post id
-- ARGV[4] epoch to adopt if the feed has none yet
-- PUBLISH is defined by store.py: 'SPUBLISH' under Redis Cluster (the channel
-- shares the feed's hash tag, so its shard is the one holding these keys).
-- Returns the delete item's entry id, or false when nothing was sent.
--! include feed_delete_core.lua
return delete_from_feed(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
