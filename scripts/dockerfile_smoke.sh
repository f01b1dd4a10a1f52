#!/usr/bin/env bash
# Run the Dockerfile's install and start steps outside a container, in a fresh venv under /tmp:
# the same deploy/docker/install.sh steps on a copy of the same COPY sources, then the image's
# ENTRYPOINT with its KVSERVE_* env. Checks /health, /ready, one completion, /metrics, the image's
# HEALTHCHECK command, and a clean exit on SIGTERM.
#
#   scripts/dockerfile_smoke.sh            # everything fresh (downloads the model like the image)
#   FETCH_MODEL=0 KVSERVE_HOME=~/.cache/kvserve scripts/dockerfile_smoke.sh   # the "mounted model" way
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/dockerfile_smoke.sh  # as in the image
#
# TORCH_INDEX_URL defaults to empty here (plain `pip install torch==...` from the default index).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/kvserve-smoke.XXXXXX)"
LOG="$WORK/server.log"
SERVER_PID=""

cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  [[ "${KEEP_SMOKE:-0}" == 1 ]] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "SMOKE FAIL: $*" >&2; [[ -f "$LOG" ]] && tail -n 40 "$LOG" >&2; exit 1; }

# Values the Dockerfile declares (ARG defaults, ENTRYPOINT, HEALTHCHECK), read from the Dockerfile itself.
dockerfile_arg() { sed -n "s/^ARG $1=//p" "$ROOT/Dockerfile" | head -n 1; }
export VENV="$WORK/venv"
export TORCH_VERSION="${TORCH_VERSION:-$(dockerfile_arg TORCH_VERSION)}"
export TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
export FETCH_MODEL="${FETCH_MODEL:-$(dockerfile_arg FETCH_MODEL)}"
export KVSERVE_HOME="${KVSERVE_HOME:-$WORK/models}"
mapfile -t ENTRYPOINT < <(python3 -c '
import json, re, sys
text = open(sys.argv[1]).read()
print("\n".join(json.loads(re.findall(r"^ENTRYPOINT (.*)$", text, re.M)[-1])))' "$ROOT/Dockerfile")
HEALTHCHECK_PY="$(python3 -c '
import json, re, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
cmd = json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M).group(1))
assert cmd[:2] == ["python3", "-c"], cmd
print(cmd[2])' "$ROOT/Dockerfile")"

echo "== copy the build context ($WORK/src)"
mkdir -p "$WORK/src"
cp -r "$ROOT/pyproject.toml" "$ROOT/engine" "$ROOT/service" "$WORK/src/"
[[ -f "$ROOT/README.md" ]] && cp "$ROOT/README.md" "$WORK/src/" || echo "# kvserve" >"$WORK/src/README.md"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +

echo "== install.sh torch (torch==$TORCH_VERSION${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL})"
sh "$ROOT/deploy/docker/install.sh" torch
echo "== install.sh app"
sh "$ROOT/deploy/docker/install.sh" app "$WORK/src"
echo "== install.sh model (FETCH_MODEL=$FETCH_MODEL, KVSERVE_HOME=$KVSERVE_HOME)"
sh "$ROOT/deploy/docker/install.sh" model

# Start as the image does, but bound to loopback: this is a test on a shared machine.
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
BASE="http://127.0.0.1:$PORT"
echo "== start: ${ENTRYPOINT[*]} on $BASE"
(cd "$WORK" && KVSERVE_HOST=127.0.0.1 KVSERVE_PORT="$PORT" PATH="$VENV/bin:$PATH" \
  PYTHONDONTWRITEBYTECODE=1 exec "${ENTRYPOINT[@]}") >"$LOG" 2>&1 &
SERVER_PID=$!

wait_for() {  # wait_for PATH SECONDS: poll until it answers 200
  local deadline=$((SECONDS + $2))
  until curl -fs -o /dev/null "$BASE$1"; do
    kill -0 "$SERVER_PID" 2>/dev/null || fail "server exited before $1 answered"
    ((SECONDS < deadline)) || fail "$1 did not answer 200 within $2s"
    sleep 1
  done
  echo "   $1: 200"
}
wait_for /health "${SMOKE_START_TIMEOUT:-300}"
wait_for /ready "${SMOKE_START_TIMEOUT:-300}"

echo "== decode attention runs on kvserve's paged kernel (built from the installed package by g++)"
! grep -q "paged kernel is unavailable" "$LOG" || fail "the paged decode-attention kernel did not build"

echo "== one completion"
curl -fsS "$BASE/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}' \
  >"$WORK/completion.json" || fail "completion request failed"
python3 - "$WORK/completion.json" <<'PY' || fail "bad completion body: $(cat "$WORK/completion.json")"
import json, sys
body = json.load(open(sys.argv[1]))
choice = body["choices"][0]
assert body["usage"]["completion_tokens"] > 0 and choice["text"], body
assert choice["finish_reason"] in ("stop", "length"), choice
print(f"   text={choice['text']!r} usage={body['usage']}")
PY

echo "== /metrics counts it"
curl -fsS "$BASE/metrics" | grep -E '^kvserve_generation_tokens_total\{.*\} [1-9]' \
  || fail "kvserve_generation_tokens_total did not move"

echo "== the image's HEALTHCHECK command"
KVSERVE_PORT="$PORT" "$VENV/bin/python3" -c "$HEALTHCHECK_PY" || fail "HEALTHCHECK command failed"

echo "== SIGTERM drains and exits 0"
kill -TERM "$SERVER_PID"
rc=0
wait "$SERVER_PID" || rc=$?
SERVER_PID=""
[[ $rc == 0 ]] || fail "server exited $rc after SIGTERM"
echo "SMOKE OK"
