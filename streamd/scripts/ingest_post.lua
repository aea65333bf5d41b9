-- Accept a post: append it to the ingest stream and keep its record, once per
-- idempotency key. Everything here lives in the ingest shard's slot.
--
-- KEYS[1] ingest stream      KEYS[2] idempotency hash (KEYS[1] again when unused)
-- KEYS[3] post record key prefix (`...:post:`), completed here with the post id
-- ARGV[1] author             ARGV[2] post body JSON        ARGV[3] lists JSON
-- ARGV[4] feeds JSON         ARGV[5] idempotency TTL (0: no key)
-- ARGV[6] record TTL         ARGV[7] shard                 ARGV[8] shard count
--
-- Returns {1, post id, body} for a new post, {0, post id, body} for a repeat.
--! include ingest_accept_core.lua
local reply = accept_post(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), {})
return reply
