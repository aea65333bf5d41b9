-- A feed's meta and its newest entries, read together: what a subscribe
-- answers with and resumes from (history.Histories, over the auto-pipeline:
-- one command, where MULTI/EXEC would be four on a shared connection).
--
-- KEYS[1] meta hash   KEYS[2] history stream
-- ARGV[1] how many of the newest entries (>= 1)
--
-- Returns {{epoch, trimmed}, entries newest first}.
return {
  redis.call('HMGET', KEYS[1], 'epoch', 'trimmed'),
  redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[1]),
}
