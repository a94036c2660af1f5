#!/usr/bin/env bash
# Opt-in benchmark with the real DGL and torch: time from the command to the first training step
# and to the job's end, for dglrun (direct and torchrun trainer modes) and DGL's own launch.py
# over ssh, on the same network-namespace hosts (as scripts/e2e-real-dgl.sh builds them: one
# bridge, each host with its own /dev/shm, its dgl-agent and an sshd on port 22).
#
# The launchers are interleaved run by run (run 1 of every launcher, then run 2, ...), so that
# load from elsewhere on the machine hits all of them alike. Hosts are namespaces of one
# machine and share its clock: train_dist.py prints the wall-clock time of its first step, and
# the script subtracts the time it started the launcher. "first step" is the latest first step
# of any rank (DDP steps all ranks together), "init" the latest return of
# dgl.distributed.initialize, "end" the launcher's exit.
#
# Usage: scripts/e2e-first-step.sh [--hosts N] [--shape TRAINERS:SAMPLERS] [--runs K]
#                                  [--launchers "L ..."] [--keep] [--no-build]
#   --hosts N      number of machines (2..9; default 2)
#   --shape T:S    trainers and samplers per machine (default 1:0); one server per machine
#   --runs K       runs of each launcher (default 5)
#   --launchers    any of: launchpy (DGL's launch.py over ssh), direct, torchrun (dglrun's
#                  trainer modes), direct-wait, torchrun-wait (the same with --wait-servers:
#                  trainers start once every server port listens)
#                  (default "launchpy direct torchrun direct-wait torchrun-wait")
#   --keep         keep the work directory (logs of every run)
#   --no-build     use target/release/dgl-agent and dgl-coord as they are (no cargo build)
# Environment: E2E_PYTHON (python with dgl and torch; default the venv of e2e-real-dgl.sh),
# E2E_NODES (graph size, default 2000), E2E_TIMEOUT (seconds per run, default 300),
# E2E_BIN_DIR (dgl-agent and dgl-coord from this directory; implies --no-build),
# DGL_TOOLS (directory with DGL's launch.py; default /work/shared/dgl-tools).
#
# Needs root, iproute2, util-linux, openssh-server and openssh-client. Prints one line per
# run and a min / median / max table per launcher; exits 1 if any run failed.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
E2E_DIR=$REPO/integration-tests/e2e
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/dglrun-e2e

HOSTS=2
SHAPE=1:0
RUNS=5
LAUNCHERS="launchpy direct torchrun direct-wait torchrun-wait"
KEEP=0
BUILD=1
while (($#)); do
    case $1 in
    --hosts) HOSTS=$2 && shift ;;
    --shape) SHAPE=$2 && shift ;;
    --runs) RUNS=$2 && shift ;;
    --launchers) LAUNCHERS=$2 && shift ;;
    --keep) KEEP=1 ;;
    --no-build) BUILD=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2 && exit 2 ;;
    esac
    shift
done
[[ $HOSTS =~ ^[2-9]$ ]] || { echo "--hosts must be 2..9" >&2 && exit 2; }
[[ $SHAPE =~ ^[1-9]:[0-9]$ ]] || { echo "--shape must be TRAINERS:SAMPLERS, e.g. 2:1" >&2 && exit 2; }
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "--runs must be a positive number" >&2 && exit 2; }
for l in $LAUNCHERS; do
    [[ $l =~ ^(launchpy|direct|torchrun|direct-wait|torchrun-wait)$ ]] ||
        { echo "--launchers: unknown launcher '$l'" >&2 && exit 2; }
done
IFS=: read -r TRAINERS SAMPLERS <<<"$SHAPE"
WORLD=$((HOSTS * TRAINERS))

TIMEOUT=${E2E_TIMEOUT:-300}
NODES=${E2E_NODES:-2000}
DGL_TOOLS=${DGL_TOOLS:-/work/shared/dgl-tools}
NET=198.18.78 # RFC 2544 range, apart from e2e-real-dgl.sh's, so both can run at once
AGENT_PORT=47001
SERVER_PORT=30050
GRAPH=e2e

fail() {
    echo "FAIL: $*" >&2
    exit 1
}
[[ $(id -u) == 0 ]] || fail "needs root (network and mount namespaces)"
for tool in ip unshare mount timeout ssh ssh-keygen; do
    command -v "$tool" >/dev/null || fail "needs '$tool'"
done
SSHD=$(command -v sshd || echo /usr/sbin/sshd)
[[ -x $SSHD ]] || fail "needs sshd (apt-get install openssh-server)"
[[ -f $DGL_TOOLS/launch.py ]] || fail "no launch.py in $DGL_TOOLS (set DGL_TOOLS)"
PY=
for cand in "${E2E_PYTHON:-}" "$CACHE/venv/bin/python3" python3; do
    if [[ -n $cand ]] && command -v "$cand" >/dev/null && "$cand" -c "import dgl, torch" >/dev/null 2>&1; then
        PY=$("$cand" -c 'import sys; print(sys.executable)')
        break
    fi
done
[[ -n $PY ]] || fail "no python with dgl and torch (see scripts/e2e-real-dgl.sh --install, or set E2E_PYTHON)"

if [[ -n ${E2E_BIN_DIR:-} ]]; then BUILD=0; fi
BIN=${E2E_BIN_DIR:-$REPO/target/release}
if ((BUILD)); then cargo build --release -p dglrun-agent -p dglrun-cli --bins; fi
for b in dgl-agent dgl-coord; do [[ -x $BIN/$b ]] || fail "$BIN/$b is missing"; done

PREFIX=dglrun-fs-$$
NS_COORD=$PREFIX-c
NS_HOST=()
for ((m = 0; m < HOSTS; m++)); do NS_HOST+=("$PREFIX-h$m"); done
host_ip() { echo "$NET.$(($1 + 2))"; }

HOST_PIDS=()
# shellcheck disable=SC2317 # (invoked by the trap)
cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    for pid in "${HOST_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    sleep 0.5
    # Anything still living in our namespaces was started by this run: stop it by pid.
    for ns in "${NS_HOST[@]}" "$NS_COORD"; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    if ((KEEP)); then echo "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    exit "$status"
}
WORK=$(mktemp -d /tmp/dglrun-fs.XXXXXX)
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$WORK/bin" "$WORK/sshbin" /run/sshd
# Private copies: a rebuild during the run must not change the binaries under test.
cp "$BIN/dgl-agent" "$BIN/dgl-coord" "$WORK/bin/"
AGENT=$WORK/bin/dgl-agent
COORD=$WORK/bin/dgl-coord
SRC=$WORK/src
TOKEN=$WORK/token
head -c 32 /dev/urandom | base64 >"$TOKEN"
chmod 600 "$TOKEN"

# ssh for launch.py, unmodified: its `ssh -o StrictHostKeyChecking=no -p 22 IP 'cmd'` finds
# this wrapper first on PATH, which adds the run's key.
ssh-keygen -q -t ed25519 -N '' -f "$WORK/id"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/hostkey"
cp "$WORK/id.pub" "$WORK/authorized_keys"
cat >"$WORK/sshbin/ssh" <<EOF
#!/bin/sh
exec $(command -v ssh) -i $WORK/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes \
    -o IdentitiesOnly=yes -o LogLevel=ERROR "\$@"
EOF
chmod +x "$WORK/sshbin/ssh"

echo "== $HOSTS hosts ($NET.2..), shape $TRAINERS trainers + $SAMPLERS samplers per host, $RUNS runs of: $LAUNCHERS"
ip netns add "$NS_COORD"
ip -n "$NS_COORD" link set lo up
ip -n "$NS_COORD" link add br0 type bridge
ip -n "$NS_COORD" addr add "$NET.1/24" dev br0
ip -n "$NS_COORD" link set br0 up
for ((m = 0; m < HOSTS; m++)); do
    ns=${NS_HOST[m]}
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add eth0 type veth peer name "h$m" netns "$NS_COORD"
    ip -n "$ns" addr add "$(host_ip "$m")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$NS_COORD" link set "h$m" master br0
    ip -n "$NS_COORD" link set "h$m" up
    cat >"$WORK/sshd$m.conf" <<EOF
ListenAddress $(host_ip "$m"):22
HostKey $WORK/hostkey
AuthorizedKeysFile $WORK/authorized_keys
PidFile none
StrictModes no
PermitRootLogin yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
MaxStartups 1000
MaxSessions 1000
LogLevel ERROR
EOF
    mkdir -p "$WORK/root$m"
    # sshd and the agent share the host's mount namespace, so both see its own /dev/shm.
    # shellcheck disable=SC2016 # expanded by the inner bash
    ip netns exec "$ns" unshare --mount --propagation private bash -c '
        mount -t tmpfs -o size=2g tmpfs /dev/shm || exit 1
        sshd=$1 conf=$2 log=$3
        shift 3
        "$sshd" -D -f "$conf" -E "$log" &
        exec "$@"' host "$SSHD" "$WORK/sshd$m.conf" "$WORK/sshd$m.log" \
        "$AGENT" --listen "$(host_ip "$m"):$AGENT_PORT" --root "$WORK/root$m" \
        --token-file "$TOKEN" --allow-root >"$WORK/agent-m$m.log" 2>&1 &
    HOST_PIDS+=("$!")
done
for ((m = 0; m < HOSTS; m++)); do
    ip=$(host_ip "$m")
    for port in $AGENT_PORT 22; do
        for ((tries = 0; ; tries++)); do
            ip netns exec "$NS_COORD" bash -c "</dev/tcp/$ip/$port" 2>/dev/null && break
            ((tries < 100)) || fail "nothing listens on $ip:$port (logs: $WORK/agent-m$m.log, $WORK/sshd$m.log)"
            sleep 0.1
        done
    done
    ip netns exec "$NS_COORD" env PATH="$WORK/sshbin:$PATH" ssh -p 22 "$ip" true ||
        fail "ssh to $ip does not work (log: $WORK/sshd$m.log)"
done

echo "== partitioning a random graph of $NODES nodes into $HOSTS parts"
mkdir -p "$SRC/code"
"$PY" "$E2E_DIR/partition_graph.py" --out "$SRC/data" --parts "$HOSTS" --graph-name "$GRAPH" \
    --nodes "$NODES" --method random >"$WORK/partition.log" 2>&1 ||
    { tail -n 20 "$WORK/partition.log" >&2 && fail "partition_graph.py failed"; }
for ((m = 0; m < HOSTS; m++)); do echo "$(host_ip "$m") $SERVER_PORT"; done >"$SRC/ip_config.txt"
cp "$E2E_DIR/train_dist.py" "$SRC/code/"
coord() { (cd "$SRC" && ip netns exec "$NS_COORD" env -u PYTHONPATH "$COORD" "$@"); }
coord copy --workspace ws --rel_data_path data --part_config "$SRC/data/$GRAPH.json" \
    --ip_config "$SRC/ip_config.txt" --script_folder "$SRC/code" --token-file "$TOKEN" \
    >"$WORK/copy.log" 2>&1 || { tail -n 20 "$WORK/copy.log" >&2 && fail "dgl-coord copy failed"; }

TRAIN="$PY code/train_dist.py --graph_name $GRAPH --ip_config ip_config.txt --num_epochs 1 --max_steps 3"
ENVS=(GLOO_SOCKET_IFNAME=eth0 TP_SOCKET_IFNAME=eth0 PYTHONUNBUFFERED=1)

# One run of launcher $1 with its output in $2; returns the launcher's exit status.
run_one() {
    local launcher=$1 log=$2 mode extra=()
    case $launcher in
    launchpy)
        # launch.py reads the inputs from --workspace on every host: the hosts share the
        # file system, so it is the directory the partitions were written to.
        (cd "$SRC" && exec ip netns exec "$NS_COORD" env -u PYTHONPATH PATH="$WORK/sshbin:$PATH" \
            timeout -s INT -k 30 "$TIMEOUT" "$PY" "$DGL_TOOLS/launch.py" --workspace "$SRC" \
            --num_trainers "$TRAINERS" --num_samplers "$SAMPLERS" --num_servers 1 \
            --part_config "data/$GRAPH.json" --ip_config ip_config.txt --ssh_port 22 \
            --extra_envs "${ENVS[@]}" --num_omp_threads 1 "$TRAIN") >"$log" 2>&1
        ;;
    *)
        mode=${launcher%-wait}
        [[ $launcher == *-wait ]] && extra=(--wait-servers)
        (cd "$SRC" && exec ip netns exec "$NS_COORD" env -u PYTHONPATH \
            timeout -s INT -k 30 "$TIMEOUT" "$COORD" launch --workspace ws \
            --num_trainers "$TRAINERS" --num_samplers "$SAMPLERS" --num_servers 1 \
            --num_omp_threads 1 --part_config "data/$GRAPH.json" --ip_config ip_config.txt \
            --trainer-mode "$mode" "${extra[@]}" --token-file "$TOKEN" --extra_envs "${ENVS[@]}" \
            "$TRAIN") >"$log" 2>&1
        ;;
    esac
}

# Processes in host namespace m other than its agent and sshd (the job's leftovers).
leftovers() {
    local p out=()
    for p in $(ip netns pids "${NS_HOST[$1]}" 2>/dev/null); do
        case $(cat "/proc/$p/comm" 2>/dev/null) in dgl-agent | sshd | "") ;; *) out+=("$p") ;; esac
    done
    echo "${out[*]}"
}

# Latest value of `KEY rank=R t=T` over all ranks, minus $3; empty unless every rank printed it.
latest() {
    local key=$1 log=$2 t0=$3
    awk -v key="$key" -v world="$WORLD" -v t0="$t0" '
        { for (i = 1; i + 2 <= NF; i++) if ($i == key) {
              r = $(i + 1); t = $(i + 2); sub("rank=", "", r); sub("t=", "", t)
              if (!(r in seen) || t + 0 > seen[r]) seen[r] = t + 0 } }
        END { n = 0; mx = 0; for (k in seen) { n++; if (seen[k] > mx) mx = seen[k] }
              if (n == world) printf "%.2f", mx - t0 }' "$log"
}

declare -A FIRST INIT END
FAILURES=0
for ((run = 1; run <= RUNS; run++)); do
    for launcher in $LAUNCHERS; do
        log=$WORK/run$run-$launcher.log
        t0=$(date +%s.%N)
        status=0
        run_one "$launcher" "$log" || status=$?
        t1=$(date +%s.%N)
        end=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
        first=$(latest E2E_FIRST_STEP "$log" "$t0")
        init=$(latest E2E_INIT "$log" "$t0")
        done_lines=$(grep -c 'E2E_DONE rank=' "$log" || true)
        if ((status != 0)) || [[ -z $first ]] || ((done_lines != WORLD)); then
            FAILURES=$((FAILURES + 1))
            echo "run $run $launcher: FAIL (exit $status, $done_lines of $WORLD ranks done; log $log)"
            tail -n 5 "$log" | sed 's/^/    /'
            KEEP=1
        else
            FIRST[$launcher]+="$first "
            INIT[$launcher]+="$init "
            END[$launcher]+="$end "
            echo "run $run $launcher: init ${init}s, first step ${first}s, end ${end}s"
        fi
        # Nothing of the job may be left before the next launcher starts.
        for ((m = 0; m < HOSTS; m++)); do
            for ((tries = 0; tries < 100; tries++)); do
                [[ -z $(leftovers "$m") ]] && break
                sleep 0.1
            done
            left=$(leftovers "$m")
            if [[ -n $left ]]; then
                echo "    processes left on m$m after $launcher: killing $left"
                # shellcheck disable=SC2086
                kill -KILL $left 2>/dev/null || true
            fi
        done
    done
done

stats() { # min / median / max of the numbers in $1
    tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { printf "%-20s", "-"; exit }
        med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%5.2f / %5.2f / %5.2f", v[1], med, v[NR] }'
}
echo
echo "== $HOSTS hosts, $TRAINERS trainers + $SAMPLERS samplers per host, $NODES nodes; seconds from the command, min / median / max of $RUNS runs"
printf '%-16s %-22s %-22s %-22s\n' launcher "initialize returned" "first step" "job end"
for launcher in $LAUNCHERS; do
    printf '%-16s %-22s %-22s %-22s\n' "$launcher" "$(stats "${INIT[$launcher]:-}")" \
        "$(stats "${FIRST[$launcher]:-}")" "$(stats "${END[$launcher]:-}")"
done
((FAILURES == 0)) || fail "$FAILURES runs failed (logs kept in $WORK)"
