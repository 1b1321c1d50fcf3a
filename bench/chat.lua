-- wrk script for bench/run.py: POST one small non-streaming chat completion per request
-- and print the exact latency percentiles as one JSON line when the run ends.
-- Environment: BENCH_MODEL (model name), BENCH_API_KEY (optional bearer key),
-- BENCH_PATH (default /v1/chat/completions), BENCH_BODY (a whole JSON body instead of the
-- default small chat; bench/run.py's variant rows send a 4 KB prompt with it).

local model = os.getenv("BENCH_MODEL") or "mock-gpt"
local key = os.getenv("BENCH_API_KEY")

wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
wrk.body = os.getenv("BENCH_BODY")
if not wrk.body or wrk.body == "" then
  wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}'
end

-- No per-response callback: defining `response` makes wrk build Lua strings for every
-- reply and slows the load tool itself. Statuses >= 400 are counted by wrk in
-- summary.errors.status, which `done` reports.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"lat_mean_us":%.1f,"lat_max_us":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
