-- PATCH /v1/sessions/<random id> with If-Match: the optimistic update. The version sent is
-- the last one this thread saw of that session; a 409 counts as a conflict and teaches the
-- current version (as a client re-reading after a conflict would).
local common = dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local n = 0

function init(args)
  common.init()
end

function request()
  local id = common.random_id()
  n = n + 1
  local headers = common.headers({
    ["Content-Type"] = "application/json",
    ["If-Match"] = '"' .. (versions[id] or 1) .. '"',
  })
  local body = '{"patch":{"work_in_progress":{"step":' .. n ..
    ',"plan":"benchmark update","done":false}}}'
  return wrk.format("PATCH", "/v1/sessions/" .. id, headers, body)
end

function response(status, hdrs, body)
  common.track(status, body)
end
