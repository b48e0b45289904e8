-- POST /v1/sessions: a new session owned by the caller.
local common = dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local headers
-- The body comes from bench/shape.py (the peer scenario stores the same session).
local body = assert(os.getenv("BENCH_CREATE_BODY"), "BENCH_CREATE_BODY is not set")

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
