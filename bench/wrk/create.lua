-- POST /v1/sessions: a new session owned by the caller.
local common = dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local headers
local body = '{"work_in_progress":{"step":1,"plan":"benchmark create"},' ..
  '"context_summary":{"goal":"measure","owner":"bench"}}'

function init(args)
  common.init()
  headers = common.headers({ ["Content-Type"] = "application/json" })
end

function request()
  return wrk.format("POST", "/v1/sessions", headers, body)
end

function response(status, hdrs, body)
  common.track(status, body)
end
