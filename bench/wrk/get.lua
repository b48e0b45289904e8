-- GET /v1/sessions/<random id>: the hot GET (active ids) or the warm GET (dormant ids).
-- BENCH_PATH (default /v1/sessions/) lets the floor baseline reuse it (/floor/).
local common = dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local prefix = os.getenv("BENCH_PATH") or "/v1/sessions/"
local headers

function init(args)
  common.init()
  headers = common.headers()
end

function request()
  return wrk.format("GET", prefix .. common.random_id(), headers)
end

function response(status, hdrs, body)
  common.track(status, body)
end
