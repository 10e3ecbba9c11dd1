-- Workload: the Standard Webhooks event of stdwebhooks.lua, its body framed by Transfer-Encoding: chunked.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

common.install(function(opts, f) return common.chunked(common.standard_head(opts, f), f[4]) end)
