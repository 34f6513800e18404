"""The Lua scripts behind ``bot.queue.redis_queue``: one script per state transition.

Every script gets the key prefix as ``ARGV[1]`` and the terminal jobs' TTL (seconds) as
``ARGV[2]``; its own arguments follow. Keys (all under ``{prefix}:``):

``job:{id}``      hash: the job (``bot.queue.codec``) plus ``score``, ``round``, ``worker``
                  and the Redis-time stamps; gets a TTL once the job is terminal
``queue``         zset of queued job ids, score = round * 2**21 + (seq % 2**21)
``running``       zset of running job ids, score = lease deadline (Redis time)
``user:{uid}``    set of the user's pending (queued or running) job ids
``user_round``    hash user id -> round of the user's newest job
``round``         the round of the job taken last (never decreases)
``seq``           arrival counter
``stats``         hash: ``job_seconds`` (EWMA), ``samples``, ``seed``
``workers``       hash worker name -> "max_batch last_seen" (written by take)
``events``        stream: one entry ``job``/``state`` per job that became terminal

Job keys are built inside the scripts from the prefix, so this needs one Redis node (not a
Cluster). Numbers go back to Redis through ``string.format``: Lua's default conversion keeps
only 14 significant digits, too few for scores and epoch times.
"""

from __future__ import annotations

# Shared by every script: key names, Redis's clock, and the one way a job becomes terminal.
PRELUDE = r"""
local P = ARGV[1]
local TERMINAL_TTL = tonumber(ARGV[2])
local function k(name) return P .. ':' .. name end
local function jk(id) return P .. ':job:' .. id end
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
local function int(x) return string.format('%.0f', x) end
local function job_seconds(default)
  local s = redis.call('HMGET', k('stats'), 'job_seconds', 'samples', 'seed')
  if s[2] and tonumber(s[2]) > 0 then return tonumber(s[1]) end
  if s[3] then return tonumber(s[3]) end
  return default
end
-- A job leaves the queue for good: stamp it, drop it from its user's pending set, let its
-- hash expire later, and tell the bots through the events stream.
local function ended(id, state, now)
  local key = jk(id)
  redis.call('HSET', key, 'state', state, 'finished_at', fmt(now))
  local uid = redis.call('HGET', key, 'user_id')
  if uid then
    local ukey = k('user:' .. uid)
    redis.call('SREM', ukey, id)
    if redis.call('SCARD', ukey) == 0 then
      -- Nothing pending: the user's round only matters while it is ahead of the current.
      local last = redis.call('HGET', k('user_round'), uid)
      local cur = tonumber(redis.call('GET', k('round')) or '0')
      if last and tonumber(last) < cur then redis.call('HDEL', k('user_round'), uid) end
    end
  end
  redis.call('EXPIRE', key, TERMINAL_TTL)
  redis.call('XADD', k('events'), 'MAXLEN', '~', '100000', '*', 'job', id, 'state', state)
end
"""

# ARGV: 3 id, 4 user id, 5 ttl_s, 6 max_per_user, 7 max_total, 8 default job seconds,
# 9.. field/value pairs. -> {'ok', position} | {'user_limit', pending} | {'full', job_s}
# | {'dup', 0}
SUBMIT = r"""
local id, uid = ARGV[3], ARGV[4]
local key = jk(id)
local state = redis.call('HGET', key, 'state')
if state == 'queued' then
  -- A retried submit (the reply was lost): the job is in already.
  return {'ok', redis.call('ZRANK', k('queue'), id) + 1}
end
if state then return {'dup', 0} end
local pending = redis.call('SCARD', k('user:' .. uid))
if pending >= tonumber(ARGV[6]) then return {'user_limit', pending} end
if redis.call('ZCARD', k('queue')) >= tonumber(ARGV[7]) then
  return {'full', fmt(job_seconds(tonumber(ARGV[8])))}
end
-- Virtual rounds: a user's next job goes one round after their previous one, but never
-- before the round being served now.
local cur = tonumber(redis.call('GET', k('round')) or '0')
local last = redis.call('HGET', k('user_round'), uid)
local round = cur
if last then round = math.max(cur, tonumber(last) + 1) end
local seq = redis.call('INCR', k('seq'))
local score = int(round * 2097152 + (seq % 2097152))
local now = now_s()
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', key, unpack(fields))
redis.call('HSET', key, 'state', 'queued', 'score', score, 'round', int(round),
  'submitted_at', fmt(now), 'deadline', fmt(now + tonumber(ARGV[5])), 'cancel_requested', '0')
redis.call('ZADD', k('queue'), score, id)
redis.call('SADD', k('user:' .. uid), id)
redis.call('HSET', k('user_round'), uid, int(round))
return {'ok', redis.call('ZRANK', k('queue'), id) + 1}
"""

# ARGV: 3 worker, 4 max_count, 5 lease_s, 6 delivery margin s, 7 max_attempts,
# 8 default job seconds, 9 this worker's max batch, 10 poison error text.
# -> {redis now, {job hash (flat), ...}}
TAKE = r"""
local worker, want = ARGV[3], tonumber(ARGV[4])
local lease, margin = tonumber(ARGV[5]), tonumber(ARGV[6])
local max_attempts = tonumber(ARGV[7])
local now = now_s()
redis.call('HSET', k('workers'), worker, ARGV[9] .. ' ' .. fmt(now))
-- Leases that ran out: their worker stopped reporting (killed, hung, cut off).
local stale = redis.call('ZRANGEBYSCORE', k('running'), '-inf', fmt(now), 'LIMIT', 0, 100)
for _, id in ipairs(stale) do
  redis.call('ZREM', k('running'), id)
  local key = jk(id)
  local h = redis.call('HMGET', key, 'state', 'attempts', 'score', 'cancel_requested')
  if h[1] == 'running' then
    redis.call('HDEL', key, 'worker')
    if h[4] == '1' then
      ended(id, 'cancelled', now)
    elseif tonumber(h[2] or '0') >= max_attempts then
      -- Taken max_attempts times and lost each time: it may be what kills the workers.
      redis.call('HSET', key, 'error', ARGV[10])
      ended(id, 'failed', now)
    else
      redis.call('HSET', key, 'state', 'queued', 'tokens_so_far', '0')
      redis.call('ZADD', k('queue'), h[3], id)
    end
  end
end
-- Share the work out: with several live workers (seen within a lease), one takes at most
-- its share of everything queued and running. A busy worker asks at every decode step and
-- an idle one only every poll, so without this the busy one would take every new job while
-- another GPU sat idle.
local seen = redis.call('HGETALL', k('workers'))
local live = 0
for i = 2, #seen, 2 do
  local last = tonumber(string.match(seen[i], '%S+%s+(%S+)') or '0')
  if last >= now - lease then live = live + 1 end
end
if live > 1 then
  local running = redis.call('ZRANGE', k('running'), 0, -1)
  local mine = 0
  for _, id in ipairs(running) do
    if redis.call('HGET', jk(id), 'worker') == worker then mine = mine + 1 end
  end
  local total = redis.call('ZCARD', k('queue')) + #running
  want = math.min(want, math.max(math.ceil(total / live) - mine, 0))
end
local js = job_seconds(tonumber(ARGV[8]))
local cur = tonumber(redis.call('GET', k('round')) or '0')
local taken = {}
local budget = want + 1000
while #taken < want and budget > 0 do
  budget = budget - 1
  local top = redis.call('ZPOPMIN', k('queue'))
  if #top == 0 then break end
  local id = top[1]
  local key = jk(id)
  local h = redis.call('HMGET', key, 'state', 'cancel_requested', 'deadline', 'round',
    'attempts')
  if h[1] == 'queued' then
    if h[2] == '1' then
      ended(id, 'cancelled', now)
    elseif now + js + margin > tonumber(h[3]) then
      -- Its interaction token would die before the page could be delivered.
      ended(id, 'expired', now)
    else
      redis.call('HSET', key, 'state', 'running', 'worker', worker, 'started_at', fmt(now),
        'attempts', int(tonumber(h[5] or '0') + 1), 'tokens_so_far', '0')
      redis.call('ZADD', k('running'), fmt(now + lease), id)
      cur = math.max(cur, tonumber(h[4]))
      taken[#taken + 1] = redis.call('HGETALL', key)
    end
  end
end
redis.call('SET', k('round'), int(cur))
return {fmt(now), taken}
"""

# ARGV: 3 worker, 4 id, 5 tokens, 6 lease_s -> 'ok' | 'cancel' | 'lost'
PROGRESS = r"""
local key = jk(ARGV[4])
local h = redis.call('HMGET', key, 'state', 'worker', 'cancel_requested')
if h[1] ~= 'running' or h[2] ~= ARGV[3] then return 'lost' end
redis.call('ZADD', k('running'), 'XX', fmt(now_s() + tonumber(ARGV[6])), ARGV[4])
redis.call('HSET', key, 'tokens_so_far', ARGV[5])
if h[3] == '1' then return 'cancel' end
return 'ok'
"""

# ARGV: 3 worker, 4 id, 5 terminal state, 6 job seconds sample ('' none), 7 EWMA alpha,
# 8.. field/value pairs (result, error...). -> 1 (recorded) | 0 (not this worker's)
FINISH = r"""
local worker, id, state = ARGV[3], ARGV[4], ARGV[5]
local key = jk(id)
local h = redis.call('HMGET', key, 'state', 'worker')
if h[2] ~= worker then return 0 end
if h[1] == state then return 1 end  -- a retried finish whose reply was lost
if h[1] ~= 'running' then return 0 end
redis.call('ZREM', k('running'), id)
if #ARGV >= 8 then
  local fields = {}
  for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', key, unpack(fields))
end
if ARGV[6] ~= '' then
  local s = redis.call('HMGET', k('stats'), 'job_seconds', 'samples')
  local n = tonumber(s[2] or '0')
  local v = tonumber(ARGV[6])
  if n > 0 then v = tonumber(s[1]) + tonumber(ARGV[7]) * (v - tonumber(s[1])) end
  redis.call('HSET', k('stats'), 'job_seconds', fmt(v), 'samples', int(n + 1))
end
ended(id, state, now_s())
return 1
"""

# ARGV: 3 id -> {'cancelled' | 'cancelling', redis now, job hash} | {'gone'}
CANCEL = r"""
local id = ARGV[3]
local key = jk(id)
local state = redis.call('HGET', key, 'state')
local now = now_s()
if state == 'queued' then
  redis.call('ZREM', k('queue'), id)
  redis.call('HSET', key, 'cancel_requested', '1')
  ended(id, 'cancelled', now)
  return {'cancelled', fmt(now), redis.call('HGETALL', key)}
end
if state == 'running' then
  -- The worker sees the flag at its next progress report and stops the job.
  redis.call('HSET', key, 'cancel_requested', '1')
  return {'cancelling', fmt(now), redis.call('HGETALL', key)}
end
return {'gone'}
"""

# ARGV: 3 worker, 4.. ids -> how many went back to the queue
REQUEUE = r"""
local worker = ARGV[3]
local count = 0
local now = now_s()
for i = 4, #ARGV do
  local id = ARGV[i]
  local key = jk(id)
  local h = redis.call('HMGET', key, 'state', 'worker', 'score', 'cancel_requested')
  if h[1] == 'running' and h[2] == worker then
    redis.call('ZREM', k('running'), id)
    redis.call('HDEL', key, 'worker')
    if h[4] == '1' then
      ended(id, 'cancelled', now)
    else
      -- Its old score: it goes back ahead of everything that arrived after it.
      redis.call('HSET', key, 'state', 'queued', 'tokens_so_far', '0')
      redis.call('ZADD', k('queue'), h[3], id)
      count = count + 1
    end
  end
end
return count
"""

# ARGV: 3 consumer, 4 id, 5 claim seconds -> 1 (deliver it) | 0 (delivered already) |
# -1 (another consumer claimed it less than the claim seconds ago and may be sending it now)
CLAIM_DELIVERY = r"""
local id, consumer = ARGV[4], ARGV[3]
if redis.call('EXISTS', k('delivered:' .. id)) == 1 then return 0 end
local holder = redis.call('GET', k('delivering:' .. id))
if holder and holder ~= consumer then return -1 end
redis.call('SET', k('delivering:' .. id), consumer, 'EX', tonumber(ARGV[5]))
return 1
"""
