#!/usr/bin/env bash
# Runs dglrun.sbatch on this machine against stand-ins for Slurm (srun, scontrol, getent)
# and for dgl-agent and dgl-coord, on loopback addresses only, and checks what a real Slurm
# cluster cannot show (integration-tests/tests/slurm.rs runs the recipe on one): node names
# resolved by getent (the real cluster's nodes are known to Slurm only), the server port in
# ip_config.txt, dgl-coord's exact flags and the quoting of a training command given as
# several arguments, the token's mode while the job runs. Needs bash and python3.
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
# --output's %N replaced; like srun --disable-status, passes SIGINT on to the tasks, and kills
# them on SIGTERM. Python: a background job of a script starts with SIGINT ignored, which
# bash could not trap.
cat > "$tmp/bin/srun" <<'EOF'
#!/usr/bin/env python3
import os, signal, subprocess, sys
with open(os.environ["FAKE_PIDS"], "a") as f:
    print(os.getpid(), file=f)
args = sys.argv[1:]
out = "/dev/stdout"
while args and args[0].startswith("--"):
    if args[0].startswith("--output="):
        out = args[0][len("--output="):]
    args.pop(0)
tasks = []
for node in os.environ["SLURM_JOB_NODELIST"].split(","):
    log = open(out.replace("%N", node), "w")
    env = dict(os.environ, SLURMD_NODENAME=node)
    tasks.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
def forward(sig):
    for t in tasks:
        if t.poll() is None:
            t.send_signal(sig)
signal.signal(signal.SIGINT, lambda *_: forward(signal.SIGINT))
signal.signal(signal.SIGTERM, lambda *_: forward(signal.SIGKILL))
codes = [t.wait() for t in tasks]
sys.exit(next((c if c > 0 else 128 - c for c in codes if c != 0), 0))
EOF

# dgl-agent: records its flags, listens where told, stops on SIGTERM or SIGINT.
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
signal.signal(signal.SIGINT, stop)
while True:
    c, _ = s.accept()
    c.close()
EOF

# dgl-coord: records its flags, the token file's mode and, for launch, its directory (where it
# reads ip_config.txt); launch exits FAKE_LAUNCH_RC.
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
echo "launch in $PWD" >> "$FAKE_COORD_LOG"
exit "${FAKE_LAUNCH_RC:-0}"
EOF
chmod +x "$tmp"/bin/*

job_env=(PATH="$tmp/bin:$PATH" SLURM_JOB_ID=4242 "SLURM_JOB_NODELIST=n1,n2" SLURMD_NODENAME=n1
    FAKE_HOSTS="n1=$ip1 n2=$ip2" FAKE_COORD_LOG="$tmp/coord.log" FAKE_PIDS="$tmp/pids"
    DGLRUN_ROOT_BASE="$tmp/base" DGLRUN_ALLOW_LOOPBACK=1 DGLRUN_AGENT_PORT="$port"
    DGLRUN_AGENT_WAIT=20 DGLRUN_PART_CONFIG="$tmp/out/g.json" DGLRUN_SCRIPT_FOLDER="$tmp/code"
    DGLRUN_NUM_TRAINERS=2 DGLRUN_SERVER_PORT=30050)
job=$tmp/base/jobs/4242

# A job that runs to its end: the launch's exit status is the job's.
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
    grep -qx stopped "$log" || fail "agent n$n was not stopped"
done
cfg="[--agent-port] [$port] [--token-file] [$job/token]"
grep -qxF "copy [--workspace] [ws] [--rel_data_path] [data] [--part_config] [$tmp/out/g.json] [--script_folder] [$tmp/code] [--ip_config] [$job/ip_config.txt] $cfg token-mode=600" "$tmp/coord.log" \
    || fail "dgl-coord copy flags"
grep -qxF "launch [--workspace] [ws] [--num_trainers] [2] [--num_samplers] [0] [--num_servers] [1] [--part_config] [data/g.json] [--ip_config] [ip_config.txt] $cfg [python3 code/train.py --graph_name g --note=a\\ b] token-mode=600" "$tmp/coord.log" \
    || fail "dgl-coord launch flags"
grep -qxF "launch in $job" "$tmp/coord.log" || fail "dgl-coord launch ran outside the job directory"
[ ! -e "$job/token" ] || fail "the token file is still there"
[ "$(stat -c %a "$job")" = 700 ] || fail "job directory mode $(stat -c %a "$job")"

echo "test-fake-slurm: ok (node names resolved, ip_config.txt, agent and coordinator flags, token, exit status)"
