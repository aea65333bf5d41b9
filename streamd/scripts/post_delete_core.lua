-- Included by post_delete.lua and post_delete_fanout.lua (see feed_append_core.lua).
--
-- deletable checks a post record for a delete by `caller` ('' for admin):
-- 0 when there is no such post (or it is deleted already), -1 when the
-- caller is not its author, else the post's feeds (JSON, as the record has them).
local function deletable(record, caller)
  local rec = redis.call('HMGET', record, 'a', 'f', 'deleted')
  if not rec[1] or rec[3] then
    return 0
  end
  if caller ~= '' and caller ~= rec[1] then
    return -1
  end
  return rec[2]
end
