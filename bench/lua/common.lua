-- Shared wrk logic for every workload: walk a pre-built pool of distinct signed requests, count the
-- answers that are not 2xx, and print one machine-readable line from done().
--
-- Strategy: each workload script calls install(build), where build(args, fields) turns one pool line
-- (tab-separated fields written by bench/benchlib/pool.py) into a complete raw HTTP/1.1 request. init()
-- builds every request once, before the clock matters; request() only returns the next one. A pool that
-- runs out wraps around and counts "wraps", which the driver reports as a flawed point (duplicates
-- were sent). init() prints "BENCHREADY" once the pool is read, done() a "BENCHJSON {...}" line.
-- Script arguments: POOL_FILE ROUTE_PATH SIGNATURE_HEADER.
local M = {}

local pool, n, i = {}, 0, 0
non2xx, wraps, sent, responses = 0, 0, 0, 0
local threads = {}

local function split(line)
  local fields = {}
  for field in string.gmatch(line, "[^\t]+") do fields[#fields + 1] = field end
  return fields
end

function M.install(build)
  function setup(thread) table.insert(threads, thread) end

  function init(args)
    local opts = {pool = args[1], path = args[2] or "/", header = args[3] or "X-Signature"}
    local f = assert(io.open(opts.pool, "rb"))
    for line in f:lines() do
      n = n + 1
      pool[n] = build(opts, split(line))
    end
    f:close()
    -- The driver starts its server CPU meter at this line: wrk runs init() before it connects, so what
    -- came before (this pool's reading, seconds for a large one) is not counted as the server's run.
    io.write("BENCHREADY\n")
    io.stdout:flush()
  end

  function request()
    i = i + 1
    if i > n then i, wraps = 1, wraps + 1 end
    sent = sent + 1
    return pool[i]
  end

  function response(status, headers, body)
    responses = responses + 1
    if status < 200 or status > 299 then non2xx = non2xx + 1 end
  end

  function done(summary, latency, requests)
    local t = {non2xx = 0, wraps = 0, sent = 0, responses = 0}
    for _, thread in ipairs(threads) do
      for k, _ in pairs(t) do t[k] = t[k] + (thread:get(k) or 0) end
    end
    local e = summary.errors
    io.write(string.format(
      'BENCHJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
      '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
      '"max_us": %d, "mean_us": %.1f, "non2xx": %d, "wraps": %d, "sent": %d, "responses": %d}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
      e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      latency.mean, t.non2xx, t.wraps, t.sent, t.responses))
  end
end

-- Head of a POST with the given extra header lines; the caller appends framing and body.
function M.head(opts, lines)
  return "POST " .. opts.path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" ..
    table.concat(lines, "\r\n") .. "\r\n"
end

-- Head of a Standard Webhooks v1 POST from a pool line ID<TAB>TIMESTAMP<TAB>SIGNATURE<TAB>BODY.
function M.standard_head(opts, f)
  return M.head(opts, {"webhook-id: " .. f[1], "webhook-timestamp: " .. f[2], "webhook-signature: v1," .. f[3]})
end

function M.with_length(head, body)
  return head .. "Content-Length: " .. #body .. "\r\n\r\n" .. body
end

-- The body in two chunks (a sender's buffer boundary), then the last chunk and an empty trailer.
function M.chunked(head, body)
  local cut = math.min(256, #body)
  local a, b = body:sub(1, cut), body:sub(cut + 1)
  local out = head .. "Transfer-Encoding: chunked\r\n\r\n" .. string.format("%x\r\n", #a) .. a .. "\r\n"
  if #b > 0 then out = out .. string.format("%x\r\n", #b) .. b .. "\r\n" end
  return out .. "0\r\n\r\n"
end

return M
