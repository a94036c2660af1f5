#!/usr/bin/env bash
# The README's first command. Builds dglrun, starts three agents on this box as three "machines"
# (127.0.0.2-4), copies a small generated partition set and a stand-in DGL training script to
# them with `dgl-coord copy`, then runs a DGL-style job with `dgl-coord launch`. DGL and torch
# are not needed: integration-tests/fixtures holds stand-ins (see the README there).
#
# Environment: AGENT_PORT (agents' gRPC port, default 47001), SERVER_PORT (the DGL servers'
# base port written into ip_config.txt, default 30050).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
FIXTURES=$REPO/integration-tests/fixtures
AGENT_PORT=${AGENT_PORT:-47001}
SERVER_PORT=${SERVER_PORT:-30050}
HOST_IDS=(2 3 4) # machine m is 127.0.0.${HOST_IDS[m]}

section() { printf '\n===== %s =====\n' "$*"; }

section "Building dgl-agent and dgl-coord (release)"
cargo build --release --bins
AGENT=$REPO/target/release/dgl-agent
COORD=$REPO/target/release/dgl-coord

TMP=$(mktemp -d)
AGENT_PIDS=()
# shellcheck disable=SC2317 # (invoked by the trap)
cleanup() {
    local status=$?
    set +e
    for pid in "${AGENT_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${AGENT_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    rm -rf "$TMP"
    exit "$status"
}
# On Ctrl-C dgl-coord stops the job and exits; the script then reports and exits with its status.
trap cleanup EXIT

show_agent_log() {
    echo "--- last lines of $1:" >&2
    tail -n 20 "$1" >&2 || true
}

# The agent refuses to run jobs as root unless told; the demo runs as whoever starts it.
ROOT_FLAG=()
if [ "$(id -u)" -eq 0 ]; then
    ROOT_FLAG=(--allow-root)
fi

# One token for the demo's agents and dgl-coord (without it they would share this user's
# ~/.config/dglrun/token, which the first agent creates).
(umask 077 && head -c 32 /dev/urandom | base64 >"$TMP/token")
export DGL_AGENT_TOKEN_FILE=$TMP/token

section "Starting agents on 127.0.0.{2,3,4}:$AGENT_PORT (logs in $TMP/agent-*.log)"
for i in "${HOST_IDS[@]}"; do
    mkdir -p "$TMP/host$i"
    "$AGENT" --listen "127.0.0.$i:$AGENT_PORT" --root "$TMP/host$i" --token-file "$TMP/token" \
        "${ROOT_FLAG[@]}" >"$TMP/agent-$i.log" 2>&1 &
    AGENT_PIDS+=("$!")
done
for n in "${!HOST_IDS[@]}"; do
    i=${HOST_IDS[$n]}
    pid=${AGENT_PIDS[$n]}
    for ((tries = 0; ; tries++)); do
        if bash -c "</dev/tcp/127.0.0.$i/$AGENT_PORT" 2>/dev/null; then
            echo "agent 127.0.0.$i:$AGENT_PORT is up (pid $pid, root $TMP/host$i)"
            break
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "agent on 127.0.0.$i exited during startup" >&2
            show_agent_log "$TMP/agent-$i.log"
            exit 1
        fi
        if ((tries >= 100)); then
            echo "agent on 127.0.0.$i:$AGENT_PORT not accepting connections after 10 s" >&2
            show_agent_log "$TMP/agent-$i.log"
            exit 1
        fi
        sleep 0.1
    done
done

section "Preparing the job's inputs in $TMP/src"
python3 "$FIXTURES/gen_partitions.py" --out "$TMP/src/data" --parts "${#HOST_IDS[@]}" --graph-name demo
for i in "${HOST_IDS[@]}"; do
    echo "127.0.0.$i $SERVER_PORT"
done >"$TMP/src/ip_config.txt"
echo "ip_config.txt:"
sed 's/^/    /' "$TMP/src/ip_config.txt"
mkdir -p "$TMP/src/code"
cp "$FIXTURES/fake_dgl.py" "$TMP/src/code/train_dist.py"
echo "code/train_dist.py: the stand-in DGL script (integration-tests/fixtures/fake_dgl.py)"

# Like DGL's tools, dgl-coord reads ip_config on this host; run it where the inputs are.
cd "$TMP/src"
status=0

section "dgl-coord copy"
"$COORD" copy --workspace ws --rel_data_path data --part_config "$TMP/src/data/demo.json" \
    --ip_config "$TMP/src/ip_config.txt" --script_folder "$TMP/src/code" \
    --agent-port "$AGENT_PORT" || status=$?
if ((status != 0)); then
    echo "dgl-coord copy failed (status $status)" >&2
    exit "$status"
fi
for i in "${HOST_IDS[@]}"; do
    echo "files on 127.0.0.$i:"
    (cd "$TMP/host$i" && find . -type f | sort | sed 's/^/    /')
done

section "dgl-coord launch"
PYTHONPATH=$FIXTURES/pythonpath "$COORD" launch --workspace ws --num_trainers 2 \
    --num_samplers 1 --num_servers 1 --part_config data/demo.json --ip_config ip_config.txt \
    --agent-port "$AGENT_PORT" \
    "python3 code/train_dist.py --graph-name demo --ip_config ip_config.txt --samplers" ||
    status=$?

section "Result"
for i in "${HOST_IDS[@]}"; do
    records=$(find "$TMP/host$i" -path '*/records/*.json' | wc -l)
    echo "127.0.0.$i: $records process records written by the job"
done
echo "dgl-coord launch exited with status $status"
exit "$status"
