-- Shared by every bench/wrk script: session ids, the token, per-thread status counts, the
-- replica each thread talks to, and done() writing wrk's figures as JSON for bench/run.py.
-- Settings come from the environment (run.py sets them): BENCH_IDS (a file, one id a line),
-- BENCH_TOKEN, BENCH_OUT (the JSON file), BENCH_PORTS (comma-separated; thread i uses
-- port i mod n, so one wrk spreads over several replicas without a load balancer).

local common = {}

local function load_ids(path)
  local ids = {}
  if path == nil or path == "" then return ids end
  for line in io.lines(path) do
    if #line > 0 then ids[#ids + 1] = line end
  end
  return ids
end

common.ids = load_ids(os.getenv("BENCH_IDS"))
common.token = os.getenv("BENCH_TOKEN") or ""
common.out = os.getenv("BENCH_OUT") or "wrk-result.json"

local threads = {}
local addrs = nil
local ports = os.getenv("BENCH_PORTS")
if ports and #ports > 0 then
  addrs = {}
  for port in ports:gmatch("%d+") do
    for _, addr in ipairs(wrk.lookup("127.0.0.1", port)) do
      addrs[#addrs + 1] = addr
      break
    end
  end
end

function setup(thread)
  thread:set("thread_no", #threads + 1)
  if addrs then thread.addr = addrs[(#threads % #addrs) + 1] end
  threads[#threads + 1] = thread
end

-- BENCH_DELAY_MS paces each connection: after an answer it waits a random 0..2x that many
-- ms, so a scenario can hold a given load instead of saturating the service.
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0") or 0
if delay_ms > 0 then
  function delay() return math.random(0, 2 * delay_ms) end
end

-- Per-thread state (each thread runs its own copy of the script).
ok, conflicts, other = 0, 0, 0
versions = {}

function common.init()
  math.randomseed(os.time() * 1000 + (thread_no or 0))
end

function common.random_id()
  return common.ids[math.random(#common.ids)]
end

function common.headers(extra)
  local h = { ["Authorization"] = "Bearer " .. common.token }
  if extra then for k, v in pairs(extra) do h[k] = v end end
  return h
end

-- Count statuses; learn versions from Session answers and from 409/412 problems, like a client
-- that keeps the last version it saw of each session.
function common.track(status, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
    local id, v = body:match('^{"id":"(%x+)","version":(%d+)')
    if id then versions[id] = tonumber(v) end
  elseif status == 409 or status == 412 then
    -- 412: a stale If-Match (update.lua), the same conflict as a stale expected_version's 409
    conflicts = conflicts + 1
    local id = body:match('"instance":"/v1/sessions/(%x+)"')
    local v = body:match('"current_version":(%d+)')
    if id and v then versions[id] = tonumber(v) end
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local total = { ok = 0, conflicts = 0, other = 0 }
  for _, thread in ipairs(threads) do
    for k, _ in pairs(total) do total[k] = total[k] + (thread:get(k) or 0) end
  end
  local e = summary.errors
  local f = assert(io.open(common.out, "w"))
  f:write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"stdev":%.1f,' ..
    '"p50":%d,"p90":%d,"p95":%d,"p99":%d,"p999":%d},' ..
    '"ok":%d,"conflicts":%d,"other":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, latency.stdev,
    latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency:percentile(99.9),
    total.ok, total.conflicts, total.other))
  f:close()
end

return common
