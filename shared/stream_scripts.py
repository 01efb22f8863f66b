"""The Lua scripts behind ``shared/streams.py``: each state change that matters is one atomic script, and the ones
that change an edit's or a version's state append their audit entry (``shared/audit.py``) in the same script, so
the audit trail can never miss or invent an action."""

from __future__ import annotations

from shared.outcomes import TERMINAL_STATES

_TERMINAL_LUA = "{" + ", ".join(f"['{s.value}']=true" for s in TERMINAL_STATES) + "}"

# KEYS: edit hash, edits, audit   ARGV: edit_id, request_json, now, principal
# An id seen before answers its state and stored request (the caller tells a duplicate from a conflict).
SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGET', KEYS[1], 'state'), redis.call('HGET', KEYS[1], 'stream_id') or '',
          redis.call('HGET', KEYS[1], 'request') or ''}
end
local id = redis.call('XADD', KEYS[2], '*', 'edit_id', ARGV[1], 'request', ARGV[2])
redis.call('HSET', KEYS[1], 'edit_id', ARGV[1], 'state', 'queued', 'stream_id', id, 'request', ARGV[2],
           'submitted_at', ARGV[3], 'updated_at', ARGV[3])
redis.call('XADD', KEYS[3], '*', 'action', 'submit', 'principal', ARGV[4], 'at', ARGV[3], 'edit_id', ARGV[1])
return {1, 'queued', id, ''}
"""

# KEYS: edits, outcomes, head, version-hash, audit, edit hashes...   ARGV: group, expect_head, new_head, now, maxlen,
# version_fields_json, n, principal, then per edit: stream_id, edit_id, state, version, reason_code, reason,
# served_by, outcome_json
FINISH = """
local terminal = TERMINAL
local function audit(action, edit_id, version, detail)
  local f = {'action', action, 'principal', ARGV[8], 'at', ARGV[4]}
  if edit_id ~= '' then f[#f + 1] = 'edit_id'; f[#f + 1] = edit_id end
  if version ~= '' then f[#f + 1] = 'version'; f[#f + 1] = version end
  if detail ~= '' then f[#f + 1] = 'detail'; f[#f + 1] = detail end
  redis.call('XADD', KEYS[5], '*', unpack(f))
end
if ARGV[2] ~= '' then
  local head = redis.call('GET', KEYS[3]) or '0'
  if head ~= ARGV[2] then return -1 end
end
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[3], ARGV[3])
  local fields = cjson.decode(ARGV[6])
  for k, v in pairs(fields) do redis.call('HSET', KEYS[4], k, tostring(v)) end
  audit('version_committed', '', ARGV[3], 'parent ' .. tostring(fields['parent'] or '') .. ', ' ..
        tostring(fields['edits'] or 0) .. ' edits, ' .. tostring(fields['kind'] or 'edit'))
end
local recorded = 0
local n = tonumber(ARGV[7])
for i = 1, n do
  local b = 8 + (i - 1) * 8
  local key = KEYS[5 + i]
  local current = redis.call('HGET', key, 'state')
  if not (current and terminal[current]) then
    redis.call('HSET', key, 'edit_id', ARGV[b + 2], 'state', ARGV[b + 3], 'version', ARGV[b + 4],
               'reason_code', ARGV[b + 5], 'reason', ARGV[b + 6], 'served_by', ARGV[b + 7], 'updated_at', ARGV[4])
    if terminal[ARGV[b + 3]] then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'edit_id', ARGV[b + 2], 'state', ARGV[b + 3],
                 'outcome', ARGV[b + 8])
    end
    local detail = ARGV[b + 5]
    if ARGV[b + 7] ~= '' then detail = (detail ~= '' and (detail .. ', ') or '') .. 'served by ' .. ARGV[b + 7] end
    audit(ARGV[b + 3], ARGV[b + 2], ARGV[b + 4], detail)
    recorded = recorded + 1
  end
  if ARGV[b + 1] ~= '' then redis.call('XACK', KEYS[1], ARGV[1], ARGV[b + 1]) end
end
return recorded
""".replace("TERMINAL", _TERMINAL_LUA, 1)

# KEYS: edits, dlq   ARGV: group, stream_id, maxlen, then field/value pairs for the dead letter
DEAD_LETTER = """
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
"""

# KEYS: head   ARGV: expected head, new head -- move the head back only if nobody moved it meanwhile
REVERT_HEAD = """
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

REVERT_HEAD_TO = """
local head = tonumber(redis.call('GET', KEYS[1]) or '0')
if head > tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return head
"""

# KEYS: version counter, head   ARGV: floor (highest version number known elsewhere, e.g. in the store)
# Version numbers only grow: a rolled-back version keeps its number and files, the next commit gets a new one.
NEXT_VERSION = """
local n = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(redis.call('GET', KEYS[2]) or '0'),
                   tonumber(ARGV[1])) + 1
redis.call('SET', KEYS[1], n)
return n
"""

# KEYS: edit hashes   ARGV: now, from state, to state (only edits still in the from state move)
MARK = """
local marked = 0
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'state') == ARGV[2] then
    redis.call('HSET', KEYS[i], 'state', ARGV[3], 'updated_at', ARGV[1])
    marked = marked + 1
  end
end
return marked
"""
