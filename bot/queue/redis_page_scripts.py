"""The Lua scripts behind ``bot.queue.redis_pages``: saving a version, recording its message.

Every script gets the key prefix as ``ARGV[1]``. Keys (all under ``{prefix}:``):

``page:{job_id}``      hash: one version: ``meta`` (JSON), ``data`` (the page), ``user_id``,
                       ``created_at`` (Redis time), ``page_id``, ``version``, optionally
                       ``content`` and ``message_id``/``channel_id``/``thread_id``
``versions:{page_id}`` zset of the page's version job ids, score = version number
``pages:{user_id}``    zset of the user's page ids, score = when the page was last saved to

A page written before versions existed has a ``page:`` hash without ``page_id``/``version``
and no ``versions:`` key: it is v1 of its own page (its job id is the page id, and the user's
index already lists it by that id). Saving a version refreshes the TTL of every key of its
page, so a page expires whole. Keys are built inside the scripts, so this needs one Redis
node (not a Cluster).
"""

from __future__ import annotations

# ARGV: 1 prefix, 2 ttl s, 3 pages kept per user, 4 versions kept per page, 5 job id,
# 6 user id, 7 parent job id ('' for none), 8 meta, 9 data, 10 '1' if content, 11 content
# -> {created_at, page_id, version}
SAVE = r"""
local P = ARGV[1]
local ttl, keep, keep_versions = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local id, uid, parent = ARGV[5], ARGV[6], ARGV[7]
local function pk(x) return P .. ':page:' .. x end
local function vk(x) return P .. ':versions:' .. x end
local function versions_of(page_id)
  local ids = redis.call('ZRANGE', vk(page_id), 0, -1)
  if #ids == 0 then ids = {page_id} end
  return ids
end
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
local index = P .. ':pages:' .. uid

-- Where the version goes: in place (the same job saved again), after the newest version of
-- the parent's page, or v1 of a new page (no parent, or none of this user's).
local page_id, version
local again = redis.call('HMGET', pk(id), 'user_id', 'page_id', 'version')
local from = {false}
if parent ~= '' then from = redis.call('HMGET', pk(parent), 'user_id', 'page_id', 'version') end
if again[1] == uid then
  page_id, version = again[2] or id, tonumber(again[3] or '1')
elseif from[1] == uid then
  page_id = from[2] or parent
  if redis.call('EXISTS', vk(page_id)) == 0 then
    redis.call('ZADD', vk(page_id), tonumber(from[3] or '1'), parent)
  end
  local top = redis.call('ZREVRANGE', vk(page_id), 0, 0, 'WITHSCORES')
  version = tonumber(top[2]) + 1
else
  page_id, version = id, 1
end
local number = string.format('%d', version)

local page = pk(id)
redis.call('DEL', page)
redis.call('HSET', page, 'meta', ARGV[8], 'data', ARGV[9], 'user_id', uid, 'created_at', now,
  'page_id', page_id, 'version', number)
if ARGV[10] == '1' then redis.call('HSET', page, 'content', ARGV[11]) end
local vkey = vk(page_id)
redis.call('ZADD', vkey, number, id)

-- Too many versions: the oldest go, but never the first (rank 0).
local excess = redis.call('ZCARD', vkey) - keep_versions
if excess > 0 then
  for _, gone in ipairs(redis.call('ZRANGE', vkey, 1, excess)) do
    redis.call('DEL', pk(gone))
    redis.call('ZREM', vkey, gone)
  end
end
for _, kept in ipairs(redis.call('ZRANGE', vkey, 0, -1)) do redis.call('EXPIRE', pk(kept), ttl) end
redis.call('EXPIRE', vkey, ttl)

-- The page is the user's newest; pages past ``keep`` go whole.
redis.call('ZADD', index, now, page_id)
redis.call('EXPIRE', index, ttl)
for _, gone in ipairs(redis.call('ZREVRANGE', index, keep, -1)) do
  for _, v in ipairs(versions_of(gone)) do redis.call('DEL', pk(v)) end
  redis.call('DEL', vk(gone))
end
redis.call('ZREMRANGEBYRANK', index, 0, -(keep + 1))
return {now, page_id, number}
"""

# ARGV: 1 prefix, 2 job id, 3 user id, then field/value pairs -> 1, or 0 if not the user's
SET_MESSAGE = r"""
local page = ARGV[1] .. ':page:' .. ARGV[2]
if redis.call('HGET', page, 'user_id') ~= ARGV[3] then return 0 end
for i = 4, #ARGV - 1, 2 do redis.call('HSET', page, ARGV[i], ARGV[i + 1]) end
return 1
"""
