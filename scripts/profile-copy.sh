#!/usr/bin/env bash
# Where a copy spends its instructions: one `dgl-coord copy` of a generated one-part set into
# one agent, both under `valgrind --tool=callgrind`. Instruction counts do not depend on what
# else the machine is doing, so two runs of the same build give the same table; use it to
# judge an optimisation when wall-clock figures are too noisy.
#
#   scripts/profile-copy.sh [MIB]      (default 128 MiB; prints the top functions per side)
#
# Environment: PROFILE_DIR keeps the callgrind files there instead of a temp dir; TOP (20).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
MIB=${1:-128}
TOP=${TOP:-20}
command -v valgrind >/dev/null || {
    echo "profile-copy: valgrind is needed (apt-get install valgrind)" >&2
    exit 1
}

cargo build --release --bins
AGENT=$REPO/target/release/dgl-agent
COORD=$REPO/target/release/dgl-coord

TMP=$(mktemp -d)
OUT=${PROFILE_DIR:-$TMP}
mkdir -p "$OUT"
AGENT_PID=
# shellcheck disable=SC2317 # (invoked by the trap)
cleanup() {
    local status=$?
    set +e
    [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
    rm -rf "$TMP/src" "$TMP/host" "$TMP/cache"
    [ "$OUT" = "$TMP" ] || rm -rf "$TMP"
    exit "$status"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Three files per part: each one third of the set.
python3 integration-tests/fixtures/gen_partitions.py --out "$TMP/src/data" --parts 1 \
    --graph-name prof --bytes-per-file $((MIB * 1024 * 1024 / 3)) >/dev/null
echo "127.0.0.1 30050" >"$TMP/src/ip_config.txt"
mkdir -p "$TMP/host" "$TMP/cache"

ROOT_FLAG=()
[ "$(id -u)" -eq 0 ] && ROOT_FLAG=(--allow-root)
valgrind --tool=callgrind --callgrind-out-file="$OUT/agent.callgrind" \
    "$AGENT" --listen "127.0.0.1:$PORT" --root "$TMP/host" "${ROOT_FLAG[@]}" \
    2>"$OUT/agent.log" &
AGENT_PID=$!
for ((tries = 0; ; tries++)); do
    bash -c "</dev/tcp/127.0.0.1/$PORT" 2>/dev/null && break
    if ((tries >= 300)) || ! kill -0 "$AGENT_PID" 2>/dev/null; then
        echo "profile-copy: the agent under valgrind did not start; see $OUT/agent.log" >&2
        exit 1
    fi
    sleep 0.1
done

(
    cd "$TMP/src"
    XDG_CACHE_HOME=$TMP/cache valgrind --tool=callgrind \
        --callgrind-out-file="$OUT/coord.callgrind" 2>"$OUT/coord.log" \
        "$COORD" copy --workspace ws --rel_data_path data --part_config data/prof.json \
        --ip_config ip_config.txt --agent-port "$PORT" --progress quiet
)
kill -TERM "$AGENT_PID"
wait "$AGENT_PID" || true
AGENT_PID=

# SHA-256 is reported on its own line: valgrind's CPU hides SHA-NI, so under callgrind sha2
# runs its portable code (about 55 instructions a byte; a real run uses SHA-NI, several times
# faster). The rest of the table is what dglrun itself costs, comparable from run to run.
for side in coord agent; do
    printf '\n===== %s: %s MiB copied, top %s functions by instructions (self) =====\n' \
        "$side" "$MIB" "$TOP"
    callgrind_annotate --inclusive=no --auto=no --threshold=100 "$OUT/$side.callgrind" 2>/dev/null |
        python3 -c '
import re, sys
top, mib = int(sys.argv[1]), float(sys.argv[2])
funcs, total = {}, 0
for line in sys.stdin:
    m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$", line)
    if not m:
        continue
    n, what = int(m.group(1).replace(",", "")), m.group(2)
    if what == "PROGRAM TOTALS":
        total = n
        continue
    # "file:function [object]": keep the function, merged over the files it was inlined from.
    fn = re.sub(r" \[[^]]*\]$", "", what.split(":", 1)[-1])
    funcs[fn] = funcs.get(fn, 0) + n
sha = sum(n for f, n in funcs.items() if f.startswith("sha2::"))
rest = total - sha
per = lambda n: n / (mib * 1048576)
print(f"{total:>15,}  all instructions ({per(total):.2f} a byte)")
print(f"{sha:>15,}  SHA-256, portable code under valgrind ({per(sha):.2f} a byte)")
print(f"{rest:>15,}  everything else ({per(rest):.2f} a byte); its top functions:")
others = sorted(((n, f) for f, n in funcs.items() if not f.startswith("sha2::")), reverse=True)
for n, f in others[:top]:
    print(f"{n:>15,}  {100 * n / max(rest, 1):5.1f}%  {f[:110]}")
' "$TOP" "$MIB"
done
echo
echo "callgrind files: $OUT (open with callgrind_annotate or kcachegrind)"
