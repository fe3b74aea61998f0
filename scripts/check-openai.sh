#!/usr/bin/env bash
# Start `gemma3 serve` (with an API key) on a free loopback port, run
# scripts/openai_client_check.py against it with the official `openai` Python
# client and scripts/ollama_client_check.py with the official `ollama` one
# (its Ollama routes), then stop the server with SIGTERM and check it exits 0.
#
#   scripts/check-openai.sh            (GEMMA3_BIN=path to use a built binary)
#
# Needs the model ($GEMMA3_MODEL or the cached default); with
# GEMMA3_SKIP_MODEL_TESTS=1 a missing model skips the check instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL=${GEMMA3_MODEL:-${HOME}/.cache/gemma3/gemma-3-270m-q4_k_m.gguf}
if [ ! -f "$MODEL" ]; then
  if [ "${GEMMA3_SKIP_MODEL_TESTS:-}" = 1 ]; then
    echo "check-openai: skipped, no model at $MODEL (GEMMA3_SKIP_MODEL_TESTS=1)"
    exit 0
  fi
  echo "check-openai: no model at $MODEL: run 'gemma3 pull' or set GEMMA3_MODEL" >&2
  exit 1
fi
BIN=${GEMMA3_BIN:-${CARGO_TARGET_DIR:-target}/release/gemma3}
if [ -z "${GEMMA3_BIN:-}" ]; then
  cargo build --release --quiet -p gemma3-cli
fi
if ! "$PY" -c "import openai, ollama" 2>/dev/null; then
  "$PY" -m pip install --quiet openai ollama
fi
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
KEY="check-$$-$RANDOM"
LOG=$(mktemp)
"$BIN" serve --model "$MODEL" --port "$PORT" --parallel 4 --ctx 2048 --api-key "$KEY" >"$LOG" 2>&1 &
PID=$!
cleanup() {
  if kill -0 "$PID" 2>/dev/null; then kill -KILL "$PID" 2>/dev/null || true; fi
  rm -f "$LOG"
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "check-openai: the server exited early:" >&2
    cat "$LOG" >&2
    exit 1
  fi
  if "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null; then
    break
  fi
  sleep 0.1
done
status=0
"$PY" scripts/openai_client_check.py --base-url "http://127.0.0.1:$PORT/v1" --api-key "$KEY" || status=$?
"$PY" scripts/ollama_client_check.py --host "http://127.0.0.1:$PORT" --api-key "$KEY" || status=$?
kill -TERM "$PID"
rc=0
wait "$PID" || rc=$?
if [ "$rc" -ne 0 ]; then
  echo "check-openai: the server exited with $rc after SIGTERM (expected 0):" >&2
  cat "$LOG" >&2
  status=1
fi
exit "$status"
