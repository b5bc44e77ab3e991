#!/usr/bin/env bash
# `moe-edge serve` driven by curl, the way a shell script or a quick check uses it:
#   bash tests/server/test_curl.sh target/debug/moe-edge
# Health, model list, a non-streamed chat completion, the same request streamed (curl -N: the
# deltas joined must equal the non-streamed text, the stream ends with `data: [DONE]`, the usage
# chunk counts the tokens), a text completion, the chat page and its headers, a wrong API key
# (401), a malformed body (400) and an unknown route (404), each with the expected JSON. Python
# only reads the JSON that curl received. Exits non-zero on the first failure; the server must
# exit 0 on SIGTERM.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$(realpath "${1:-$ROOT/target/debug/moe-edge}")
read -r -a RUNNER <<<"${MOE_EDGE_TEST_RUNNER:-}"

tmp=$(mktemp -d)
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

model=$tmp/model
mkdir -p "$model"
cp "$ROOT/models/tiny-mixtral/model.onnx" "$ROOT/models/tiny-mixtral/config.json" "$model/"
cp "$ROOT/tests/fixtures/chat/tokenizer.json" "$model/"
cp "$ROOT/tests/fixtures/chat/chatml.jinja" "$model/chat_template.jinja"
echo '{"eos_token": "<|im_end|>"}' >"$model/tokenizer_config.json"

"${RUNNER[@]}" "$BIN" serve -m "$model" --addr 127.0.0.1:0 --model-name tiny --api-key secret \
  2>"$tmp/server.log" &
server_pid=$!
for _ in $(seq 600); do
  grep -q "listening on" "$tmp/server.log" && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$tmp/server.log"; echo "FAIL the server did not start"; exit 1; }
  sleep 0.2
done
url=$(sed -n 's/^listening on //p' "$tmp/server.log")
[ -n "$url" ] || { echo "FAIL the server did not start in 120 s"; exit 1; }

pass=0
ok() { echo "ok   $1"; pass=$((pass + 1)); }
fail() { echo "FAIL $1"; exit 1; }
json() { python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }
AUTH=(-H "Authorization: Bearer secret")
CHAT='{"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
       {"role": "user", "content": "What does tar do?"}], "temperature": 0, "max_tokens": 24'

[ "$(curl -sS "$url/health" | json 'v["status"]')" = ok ] && ok "GET /health" || fail "GET /health"
[ "$(curl -sS "${AUTH[@]}" "$url/v1/models" | json 'v["data"][0]["id"]')" = tiny ] \
  && ok "GET /v1/models names the model" || fail "GET /v1/models"

curl -sS "${AUTH[@]}" -H "Content-Type: application/json" -d "$CHAT}" "$url/v1/chat/completions" >"$tmp/chat.json"
text=$(json 'v["choices"][0]["message"]["content"]' <"$tmp/chat.json")
tokens=$(json 'v["usage"]["completion_tokens"]' <"$tmp/chat.json")
[ "$tokens" -ge 1 ] && ok "chat completion: $tokens tokens" || fail "chat completion: $(cat "$tmp/chat.json")"

curl -sS -N "${AUTH[@]}" -H "Content-Type: application/json" \
  -d "$CHAT, \"stream\": true, \"stream_options\": {\"include_usage\": true}}" \
  "$url/v1/chat/completions" >"$tmp/stream.txt"
[ "$(grep '^data:' "$tmp/stream.txt" | tail -1)" = "data: [DONE]" ] && ok "the stream ends with data: [DONE]" \
  || fail "the stream's last event: $(tail -3 "$tmp/stream.txt")"
streamed=$(grep '^data: {' "$tmp/stream.txt" | sed 's/^data: //' | python3 -c '
import json, sys
print("".join(c["delta"].get("content") or "" for line in sys.stdin for c in json.loads(line)["choices"]))')
[ "$streamed" = "$text" ] && ok "the streamed deltas equal the non-streamed text" \
  || fail "streamed $streamed vs $text"
usage=$(grep '^data: {' "$tmp/stream.txt" | sed 's/^data: //' | python3 -c '
import json, sys
print([json.loads(l)["usage"]["completion_tokens"] for l in sys.stdin if "usage" in json.loads(l)])')
[ "$usage" = "[$tokens]" ] && ok "the usage chunk counts $tokens tokens" || fail "usage chunks $usage, want [$tokens]"

done_text=$(curl -sS "${AUTH[@]}" -H "Content-Type: application/json" \
  -d '{"prompt": "t10 t20", "max_tokens": 5, "temperature": 0}' "$url/v1/completions" \
  | json 'v["object"] + " " + v["choices"][0]["finish_reason"]')
case "$done_text" in "text_completion "*) ok "text completion ($done_text)" ;; *) fail "text completion: $done_text" ;; esac

curl -sS -D "$tmp/page.headers" "$url/" >"$tmp/page.html"
grep -q "<title>moe-edge chat</title>" "$tmp/page.html" && grep -qi "^content-type: text/html" "$tmp/page.headers" \
  && grep -qi "^content-security-policy: default-src 'none'" "$tmp/page.headers" \
  && ok "GET / serves the chat page with its security headers" || fail "GET /: $(head -5 "$tmp/page.headers")"
curl -sS -D "$tmp/js.headers" -o /dev/null "$url/chat.js"
grep -qi "^content-type: text/javascript" "$tmp/js.headers" && ok "GET /chat.js" || fail "GET /chat.js"

expect_error() { # name, expected status, expected code, curl args...
  local name=$1 status=$2 code=$3
  shift 3
  local got
  got=$(curl -sS -o "$tmp/err.json" -w '%{http_code}' "$@")
  [ "$got" = "$status" ] || fail "$name: HTTP $got, want $status: $(cat "$tmp/err.json")"
  [ "$(json 'v["error"]["code"]' <"$tmp/err.json")" = "$code" ] || fail "$name: $(cat "$tmp/err.json")"
  ok "$name: HTTP $status, error code $code"
}
expect_error "a wrong API key" 401 invalid_api_key -H "Authorization: Bearer nope" \
  -H "Content-Type: application/json" -d "$CHAT}" "$url/v1/chat/completions"
expect_error "a malformed body" 400 invalid_json "${AUTH[@]}" -H "Content-Type: application/json" \
  -d '{"messages": [' "$url/v1/chat/completions"
expect_error "a negative temperature" 400 invalid_temperature "${AUTH[@]}" -H "Content-Type: application/json" \
  -d '{"prompt": "t10", "temperature": -1}' "$url/v1/completions"
status=$(curl -sS -o /dev/null -w '%{http_code}' "$url/v2/nothing")
[ "$status" = 404 ] && ok "an unknown route: 404" || fail "an unknown route: $status"

kill -TERM "$server_pid"
code=0
wait "$server_pid" || code=$?
server_pid=
[ "$code" = 0 ] && ok "the server exits 0 on SIGTERM" || fail "the server exited $code on SIGTERM"
echo "$pass passed"
