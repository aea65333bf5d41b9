-- Add or remove a list member, keeping the reverse index in step.
--
-- KEYS[1] the list's member set   KEYS[2] the user's member-of set (both in slot {m})
-- ARGV[1] 'add' or 'remove'       ARGV[2] list id   ARGV[3] handle
-- ARGV[4] most members a list may have
--
-- Returns 1 when changed, 0 when it already was so, -1 when the list is full.
local members, member_of = KEYS[1], KEYS[2]
local op, list_id, handle = ARGV[1], ARGV[2], ARGV[3]
if op == 'add' then
  if redis.call('SISMEMBER', members, handle) == 1 then
    return 0
  end
  if redis.call('SCARD', members) >= tonumber(ARGV[4]) then
    return -1
  end
  redis.call('SADD', members, handle)
  redis.call('SADD', member_of, list_id)
  return 1
end
redis.call('SREM', member_of, list_id)
return redis.call('SREM', members, handle)
