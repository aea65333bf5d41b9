-- Look up a user token and count one use against its per-minute budget.
--
-- KEYS[1] token record   KEYS[2] this minute's counter (same slot)
-- ARGV[1] 1 to count this call, 0 to only look up
--
-- Returns {record or false, uses this minute}.
local record = redis.call('GET', KEYS[1])
if not record then
  return {false, 0}
end
local uses = 0
if ARGV[1] == '1' then
  uses = redis.call('INCR', KEYS[2])
  if uses == 1 then
    redis.call('EXPIRE', KEYS[2], 120)
  end
end
return {record, uses}
