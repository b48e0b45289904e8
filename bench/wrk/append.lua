-- POST /v1/sessions/<random id>/timeline: one event, no expected_version.
local common = dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local headers
-- The body comes from bench/shape.py (the peer scenario appends the same event).
local body = assert(os.getenv("BENCH_APPEND_BODY"), "BENCH_APPEND_BODY is not set")

function init(args)
  common.init()
  headers = common.headers({ ["Content-Type"] = "application/json" })
end

function request()
  return wrk.format("POST", "/v1/sessions/" .. common.random_id() .. "/timeline", headers, body)
end

function response(status, hdrs, body)
  common.track(status, body)
end
