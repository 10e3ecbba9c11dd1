-- Workload: a Preservica delivery (4 events, ~1 KB of JSON) signed in a header, body framed by Content-Length.
-- Pool lines: SIGNATURE<TAB>BODY. Arguments: POOL_FILE ROUTE_PATH SIGNATURE_HEADER (Preservica-Signature
-- for /preservica; adnanh/webhook gets the same bodies with its own X-Hub-Signature-256 header).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

common.install(function(opts, f)
  return common.with_length(common.head(opts, {opts.header .. ": " .. f[1]}), f[2])
end)
