-- wrk script for perf/http.sh: POST /api/publish with the bench key, one small message.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = "bench-secret"
wrk.body = '{"channel":"org:bench:usage","data":{"n":1,"text":"a small message"}}'
