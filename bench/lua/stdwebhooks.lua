-- Workload: a Standard Webhooks v1 signed event (webhook-id, webhook-timestamp, webhook-signature) with a
-- Content-Length body, to a [hook:NAME] route. Pool lines: ID<TAB>TIMESTAMP<TAB>SIGNATURE<TAB>BODY.
-- Arguments: POOL_FILE ROUTE_PATH (the third is unused).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

common.install(function(opts, f) return common.with_length(common.standard_head(opts, f), f[4]) end)
