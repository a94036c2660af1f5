#!/usr/bin/env bash
# Runs dglrun.sbatch on this machine against stand-ins for Slurm (srun, scontrol, getent)
# and for dgl-agent and dgl-coord, on loopback addresses only, and checks what it did:
# ip_config.txt, one agent per node on its address, the coordinator's flags, the token's
# mode and removal, the exit status, and a clean stop on SIGTERM. Needs bash and python3.
#
#   deploy/slurm/test-fake-slurm.sh        (deploy/validate.sh runs it)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
sbatch_script=$here/dglrun.sbatch
tmp=$(mktemp -d)
# Every stand-in process writes its PID to $tmp/pids: whatever a failed run leaves is ended.
cleanup() {
    if [ -f "$tmp/pids" ]; then
        while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done < "$tmp/pids"
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
fail() {
    echo "test-fake-slurm: FAIL: $*" >&2
    for f in "$tmp"/out-*.txt "$tmp"/base/jobs/*/agent-*.log "$tmp"/coord.log; do
        if [ -f "$f" ]; then
            echo "--- $f" >&2
            cat "$f" >&2
        fi
    done
    exit 1
}

mkdir -p "$tmp/bin" "$tmp/out" "$tmp/code"
echo '{}' > "$tmp/out/g.json"
echo 'print("train")' > "$tmp/code/train.py"

# Two fake nodes on their own loopback addresses (127.3.x.y: outside the blocks the
# integration-test harness draws from), and a port free on them.
block=127.3.$((RANDOM % 250))
ip1=$block.1
ip2=$block.2
port=$(python3 -c 'import socket, sys; s=socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$ip1")

cat > "$tmp/bin/scontrol" <<'EOF'
#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || exit 1
tr ',' '\n' <<< "$3"
EOF

cat > "$tmp/bin/getent" <<'EOF'
#!/usr/bin/env bash
[ "$1" = ahostsv4 ] || exit 2
for pair in $FAKE_HOSTS; do
    if [ "${pair%%=*}" = "$2" ]; then echo "${pair#*=}     STREAM $2"; exit 0; fi
done
exit 2
EOF

# srun: runs the command once per node of SLURM_JOB_NODELIST, with SLURMD_NODENAME set and
# --output's %N replaced; passes SIGTERM on to the tasks.
cat > "$tmp/bin/srun" <<'EOF'
#!/usr/bin/env bash
echo $$ >> "$FAKE_PIDS"
out=/dev/stdout
while [[ ${1:-} == --* ]]; do
    case $1 in --output=*) out=${1#--output=} ;; esac
    shift
done
pids=()
for node in ${SLURM_JOB_NODELIST//,/ }; do
    SLURMD_NODENAME=$node "$@" > "${out//%N/$node}" 2>&1 &
    pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for p in "${pids[@]}"; do
    while true; do
        r=0
        wait "$p" || r=$?
        # A trapped signal interrupts wait (status > 128) while the task still runs.
        if [ "$r" -gt 128 ] && kill -0 "$p" 2>/dev/null; then continue; fi
        if [ "$r" -ne 0 ]; then rc=$r; fi
        break
    done
done
exit "$rc"
EOF

# dgl-agent: records its flags, listens where told, stops on SIGTERM.
cat > "$tmp/bin/dgl-agent" <<'EOF'
#!/usr/bin/env python3
import os, signal, socket, sys
with open(os.environ["FAKE_PIDS"], "a") as f:
    print(os.getpid(), file=f)
args = sys.argv[1:]
print("args:", " ".join(args), flush=True)
host, port = args[args.index("--listen") + 1].rsplit(":", 1)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(port)))
s.listen(16)
def stop(*_):
    print("stopped", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    c, _ = s.accept()
    c.close()
EOF

# dgl-coord: records its flags and the token file's mode; launch exits FAKE_LAUNCH_RC, or,
# when FAKE_LAUNCH_WAIT names a file, creates it and runs until SIGTERM.
cat > "$tmp/bin/dgl-coord" <<'EOF'
#!/usr/bin/env bash
echo $$ >> "$FAKE_PIDS"
cmd=$1
shift
tok=""
prev=""
for a in "$@"; do
    if [ "$prev" = --token-file ]; then tok=$a; fi
    prev=$a
done
{ printf '%s' "$cmd"; printf ' [%s]' "$@"; printf ' token-mode=%s\n' "$(stat -c %a "$tok")"; } >> "$FAKE_COORD_LOG"
[ "$cmd" = launch ] || exit 0
if [ -n "${FAKE_LAUNCH_WAIT:-}" ]; then
    trap 'echo "launch got SIGTERM" >> "$FAKE_COORD_LOG"; exit 130' TERM
    touch "$FAKE_LAUNCH_WAIT"
    while true; do sleep 0.1; done
fi
exit "${FAKE_LAUNCH_RC:-0}"
EOF
chmod +x "$tmp"/bin/*

job_env=(PATH="$tmp/bin:$PATH" SLURM_JOB_ID=4242 "SLURM_JOB_NODELIST=n1,n2" SLURMD_NODENAME=n1
    FAKE_HOSTS="n1=$ip1 n2=$ip2" FAKE_COORD_LOG="$tmp/coord.log" FAKE_PIDS="$tmp/pids"
    DGLRUN_ROOT_BASE="$tmp/base" DGLRUN_ALLOW_LOOPBACK=1 DGLRUN_AGENT_PORT="$port"
    DGLRUN_AGENT_WAIT=20 DGLRUN_PART_CONFIG="$tmp/out/g.json" DGLRUN_SCRIPT_FOLDER="$tmp/code"
    DGLRUN_NUM_TRAINERS=2 DGLRUN_SERVER_PORT=30050)
job=$tmp/base/jobs/4242

# 1. A job that runs to its end: the launch's exit status is the job's.
rc=0
env "${job_env[@]}" FAKE_LAUNCH_RC=3 bash "$sbatch_script" \
    python3 code/train.py --graph_name g "--note=a b" > "$tmp/out-plain.txt" 2>&1 || rc=$?
[ "$rc" = 3 ] || fail "exit status $rc, expected 3 (the launch's)"
[ "$(cat "$job/ip_config.txt")" = "$ip1 30050
$ip2 30050" ] || fail "ip_config.txt: $(cat "$job/ip_config.txt")"
for n in 1 2; do
    ip=ip$n
    log=$job/agent-n$n.log
    grep -qxF "args: --listen ${!ip}:$port --root $tmp/base/n$n --token-file $job/token" "$log" \
        || fail "agent n$n flags"
    grep -qx stopped "$log" || fail "agent n$n was not stopped with SIGTERM"
done
cfg="[--ip_config] [$job/ip_config.txt] [--agent-port] [$port] [--token-file] [$job/token]"
grep -qxF "copy [--workspace] [ws] [--rel_data_path] [data] [--part_config] [$tmp/out/g.json] [--script_folder] [$tmp/code] $cfg token-mode=600" "$tmp/coord.log" \
    || fail "dgl-coord copy flags"
grep -qxF "launch [--workspace] [ws] [--num_trainers] [2] [--num_samplers] [0] [--num_servers] [1] [--part_config] [data/g.json] $cfg [python3 code/train.py --graph_name g --note=a\\ b] token-mode=600" "$tmp/coord.log" \
    || fail "dgl-coord launch flags"
[ ! -e "$job/token" ] || fail "the token file is still there"
[ "$(stat -c %a "$job")" = 700 ] || fail "job directory mode $(stat -c %a "$job")"

# 2. SIGTERM during the launch (scancel, the time limit): dgl-coord is stopped, then the agents.
rm -f "$tmp/coord.log" "$job"/agent-*.log
env "${job_env[@]}" FAKE_LAUNCH_WAIT="$tmp/launched" bash "$sbatch_script" \
    "python3 code/train.py" > "$tmp/out-term.txt" 2>&1 &
script_pid=$!
echo "$script_pid" >> "$tmp/pids"
for _ in $(seq 200); do
    if [ -e "$tmp/launched" ]; then break; fi
    sleep 0.1
done
[ -e "$tmp/launched" ] || fail "the launch never started"
kill -TERM "$script_pid"
rc=0
wait "$script_pid" || rc=$?
[ "$rc" = 143 ] || fail "exit status $rc after SIGTERM, expected 143"
grep -qx "launch got SIGTERM" "$tmp/coord.log" || fail "dgl-coord launch was not sent SIGTERM"
for n in 1 2; do
    grep -qx stopped "$job/agent-n$n.log" || fail "agent n$n not stopped after SIGTERM"
done
[ ! -e "$job/token" ] || fail "the token file is still there after SIGTERM"

echo "test-fake-slurm: ok (a job run to its end; a job stopped by SIGTERM)"
