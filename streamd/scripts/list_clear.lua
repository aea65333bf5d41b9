-- Remove every member of a deleted list, and the list from each reverse index.
--
-- KEYS[1] the list's member set (slot {m})
-- ARGV[1] list id   ARGV[2] reverse index key prefix (`...:member-of:`)
local members = redis.call('SMEMBERS', KEYS[1])
for _, handle in ipairs(members) do
  redis.call('SREM', ARGV[2] .. handle, ARGV[1])
end
redis.call('DEL', KEYS[1])
return #members
