#!/usr/bin/env bash
# Check that Packrat works from a wheel install, as a user gets it: a fresh venv,
# `pip install <repo>` (not editable), then from a directory outside the checkout:
# archive small-cnn, profile it, serve it on 1 core, answer one request, stop.
#
#   bash scripts/check_install.sh            # PYTHON=python3.11 to pick the interpreter
#   KEEP=1 bash scripts/check_install.sh     # keep the temporary directory to look at
#
# It installs the working tree (tracked and untracked files, not what .gitignore ignores),
# copied out so the build leaves nothing in the checkout. pip's cache is kept: torch==2.13.0
# (pinned in pyproject.toml) comes from this machine's disk. Exits non-zero with a message
# naming the failed step; prints each step's time.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/packrat-install.XXXXXX")"
SERVE_PID=""
STEP="setup"
START=$SECONDS
STEP_START=$SECONDS

say() { echo "check_install: $*" >&2; }

step() {
    say "ok: $STEP ($((SECONDS - STEP_START)) s)"
    STEP="$1"
    STEP_START=$SECONDS
    say "$STEP ..."
}

cleanup() {
    local rc=$?
    if [[ -n "$SERVE_PID" ]] && kill -0 "$SERVE_PID" 2>/dev/null; then
        "$TMP/venv/bin/packrat" stop --run-dir "$TMP/work/R" >/dev/null 2>&1 || true
        # still there after a stop: end it (our own child, by pid)
        kill "$SERVE_PID" 2>/dev/null || true
        wait "$SERVE_PID" 2>/dev/null || true
    fi
    if [[ $rc -ne 0 ]]; then
        say "FAILED at step: $STEP (exit $rc, after $((SECONDS - START)) s)"
        if [[ -f "$TMP/serve.log" ]]; then
            say "last lines of packrat serve's output:"
            tail -n 30 "$TMP/serve.log" >&2
        fi
    fi
    if [[ "${KEEP:-}" == 1 || $rc -ne 0 && -n "${KEEP_ON_FAILURE:-}" ]]; then
        say "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit $rc
}
trap cleanup EXIT

fail() { say "$*"; exit 1; }

say "temporary directory $TMP"
say "venv ..."
STEP="venv"
"$PYTHON" -m venv "$TMP/venv" || fail "$PYTHON -m venv failed"
PIP="$TMP/venv/bin/pip"
PACKRAT="$TMP/venv/bin/packrat"

step "copy the working tree"
mkdir -p "$TMP/src"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -C "$TMP/src" -xf - || fail "cannot copy $REPO"
else
    cp -a "$REPO/." "$TMP/src/" && rm -rf "$TMP/src/.venv" || fail "cannot copy $REPO"
fi

step "pip install (not editable)"
"$PIP" install --quiet "$TMP/src" > "$TMP/pip.log" 2>&1 \
    || { tail -n 20 "$TMP/pip.log" >&2; fail "pip install $REPO failed (log above)"; }
# the installed package, not the checkout, is what runs below
mkdir -p "$TMP/work"
cd "$TMP/work"
where="$("$TMP/venv/bin/python" -c 'import packrat, os; print(os.path.dirname(packrat.__file__))')"
[[ "$where" == "$TMP/venv/"* ]] || fail "packrat imports from $where, not from the new venv"

export PACKRAT_CACHE_DIR="$TMP/cache"  # a cold cache of its own

step "packrat archive --zoo small-cnn"
"$PACKRAT" archive --zoo small-cnn --out D || fail "packrat archive failed"
[[ -f D/small-cnn.mar && -f D/small-cnn.example.json ]] || fail "packrat archive wrote no D/small-cnn.mar or example"

step "packrat profile --max-batch 2 --threads 1"
"$PACKRAT" profile D/small-cnn.mar --max-batch 2 --threads 1 || fail "packrat profile failed"

step "packrat serve --cores 1 (until it reports a version)"
# --max-batch 2: the grid just profiled, so serve takes it from the cache
"$PACKRAT" serve --models small-cnn=D/small-cnn.mar --run-dir R --cores 1 --max-batch 2 \
    > "$TMP/serve.log" 2>&1 &
SERVE_PID=$!
version=""
for _ in $(seq 1 600); do
    kill -0 "$SERVE_PID" 2>/dev/null || fail "packrat serve exited before serving"
    if [[ -f R/state.json ]]; then
        version="$("$PACKRAT" status --run-dir R --json 2>/dev/null | "$TMP/venv/bin/python" -c \
            'import json, sys; print(json.load(sys.stdin)["models"]["small-cnn"]["version"] or "")' \
            2>/dev/null || true)"
        [[ -n "$version" ]] && break
    fi
    sleep 0.5
done
[[ -n "$version" ]] || fail "packrat serve reported no version of small-cnn within 300 s"
say "serving small-cnn version $version"

step "one request to /predictions/small-cnn"
"$TMP/venv/bin/python" - R/torchserve D/small-cnn.example.json <<'EOF' || fail "the request failed"
import json, sys, urllib.request
from pathlib import Path

ts, example = Path(sys.argv[1]), Path(sys.argv[2])
server = json.loads((ts / "server.json").read_text())
host = server.get("host", "127.0.0.1")
port = server["ports"]["inference"]
headers = {"Content-Type": "application/json"}
keys = ts / "key_file.json"
if keys.is_file():  # token authorization is on by default
    headers["Authorization"] = "Bearer " + json.loads(keys.read_text())["inference"]["key"]
url = f"http://{host}:{port}/predictions/small-cnn"
req = urllib.request.Request(url, data=example.read_bytes(), headers=headers, method="POST")
with urllib.request.urlopen(req, timeout=60) as r:
    body = json.loads(r.read())
    print(f"POST {url} -> {r.status}: {len(body['output'])} outputs", file=sys.stderr)
    assert r.status == 200 and len(body["output"]) == 10, body
EOF

step "packrat stop"
"$PACKRAT" stop --run-dir R || fail "packrat stop failed"
rc=0
wait "$SERVE_PID" || rc=$?
SERVE_PID=""
[[ $rc -eq 0 ]] || fail "packrat serve exited $rc after stop"

STEP="done"
say "ok: packrat stop ($((SECONDS - STEP_START)) s)"
say "PASS: wheel install archived, profiled, served and stopped in $((SECONDS - START)) s"
