#!/usr/bin/env bash
# Opt-in end-to-end test with the real DGL and torch (not run by CI or scripts/test.sh).
#
# Builds dglrun, makes N "machines" on this box as network namespaces on one bridge (addresses
# in 198.18.77.0/24, the RFC 2544 benchmarking range), each with its own /dev/shm (a private
# tmpfs in its own mount namespace) and its own dgl-agent. Partitions a small random graph with
# dgl.distributed.partition_graph, pushes it with `dgl-coord copy`, then runs a real DGL job
# (DistGraph + DistNodeDataLoader + 2-layer GraphSAGE + DDP over gloo, a few steps) with
# `dgl-coord launch` in both trainer modes, and checks every run. See DESIGN.md, "How DGL
# processes find each other", for why every host needs its own namespaces.
#
# Usage: scripts/e2e-real-dgl.sh [--install] [--hosts N] [--runs "MODE:TRAINERS:SAMPLERS ..."]
#                                [--keep] [--no-build]
#   --install   if `import dgl, torch` fails, install DGL 2.1.0 + torch 2.2.1 (CPU use of the
#               PyPI wheel) into a venv under ~/.cache/dglrun-e2e (about 3 GB) and use it
#   --hosts N   number of machines (2..9; default 3)
#   --runs      launches to run (default "torchrun:1:0 direct:1:0 torchrun:1:1 direct:1:1")
#   --keep      keep the work directory (agents' roots, logs) after the run
#   --no-build  use target/release/dgl-agent and dgl-coord as they are (no cargo build)
# Environment: E2E_PYTHON (the python with dgl and torch), E2E_TIMEOUT (seconds per launch,
# default 300), E2E_NODES (graph size, default 4000), E2E_PART_METHOD (metis|random),
# E2E_HOLD_ON_FAIL (seconds to keep the hosts up after a failed launch, to look around),
# E2E_CONTROL=0 (skip the control launch with the interface variables emptied, which must
# fail or hang; E2E_CONTROL_TIMEOUT seconds, default 120),
# E2E_BIN_DIR (test the dgl-agent and dgl-coord in this directory; implies --no-build),
# E2E_LAUNCH_FLAGS (words added to each launch's flags, e.g. "--max-restarts 1"),
# E2E_TRAIN_FLAGS (words added to train_dist.py's, e.g. --fail_on_first_attempt),
# E2E_LAUNCHPY=0 (skip the launch of the same job by DGL's own launch.py over the ssh of
# `dgl-coord shims`), DGL_TOOLS (the directory holding DGL's unmodified launch.py; default
# integration-tests/fixtures/dgl-tools).
#
# Needs root (network and mount namespaces), iproute2 (`ip`) and util-linux (`unshare`).
# Without dgl/torch it prints how to get them and exits 0 with SKIP.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
E2E_DIR=$REPO/integration-tests/e2e
DGL_TOOLS=${DGL_TOOLS:-$REPO/integration-tests/fixtures/dgl-tools}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/dglrun-e2e
VENV=$CACHE/venv

INSTALL=0
HOSTS=3
RUNS="torchrun:1:0 direct:1:0 torchrun:1:1 direct:1:1"
KEEP=0
BUILD=1
while (($#)); do
    case $1 in
    --install) INSTALL=1 ;;
    --hosts) HOSTS=$2 && shift ;;
    --runs) RUNS=$2 && shift ;;
    --keep) KEEP=1 ;;
    --no-build) BUILD=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2 && exit 2 ;;
    esac
    shift
done
if ! [[ $HOSTS =~ ^[2-9]$ ]]; then
    echo "--hosts must be 2..9" >&2
    exit 2
fi
for run in $RUNS; do
    if ! [[ $run =~ ^(torchrun|direct):[1-9][0-9]*:[0-9]+$ ]]; then
        echo "--runs: '$run' is not MODE:TRAINERS:SAMPLERS (MODE torchrun or direct, e.g. direct:1:1)" >&2
        exit 2
    fi
done

TIMEOUT=${E2E_TIMEOUT:-300}
NODES=${E2E_NODES:-4000}
PART_METHOD=${E2E_PART_METHOD:-metis}
NET=198.18.77 # RFC 2544 benchmarking range; the coordinator is .1, machine m is .(m+2)
AGENT_PORT=47001
SERVER_PORT=30050
GRAPH=e2e

section() { printf '\n===== %s =====\n' "$*"; }
skip() {
    printf '\nSKIP: %s\n' "$*"
    exit 0
}

# ---------------------------------------------------------------------------------------------
# Prerequisites
# ---------------------------------------------------------------------------------------------
if [[ $(id -u) != 0 ]]; then
    skip "needs root to create network and mount namespaces (run it with sudo)"
fi
for tool in ip unshare mount timeout; do
    command -v "$tool" >/dev/null || skip "needs '$tool' (iproute2, util-linux, coreutils)"
done

has_dgl() { "$1" -c "import dgl, torch" >/dev/null 2>&1; }

# DGL 2.1.0 (the newest Linux wheel on PyPI) with torch 2.2.1 also needs, undeclared or
# mis-declared: pandas, pyyaml and pydantic (imported by dgl.graphbolt), numpy < 2 (torch 2.2
# is built against numpy 1), pandas < 2.3 (newer pandas needs numpy 2), and torchdata 0.7.1
# (DGL imports torchdata.datapipes, which torchdata >= 0.9 removed and 0.8 needs torch >= 2.3;
# 0.7.1 declares torch==2.1.1 but works with 2.2.1, hence --no-deps).
PIP_STEP1='dgl==2.1.0 torch==2.2.1 "numpy<2" "pandas<2.3" pyyaml pydantic'
PIP_STEP2='--no-deps torchdata==0.7.1'

install_deps() {
    section "Installing dgl 2.1.0 + torch 2.2.1 into $VENV (large download, several minutes)"
    mkdir -p "$CACHE"
    [[ -x $VENV/bin/python3 ]] || python3 -m venv "$VENV"
    eval "\"$VENV/bin/pip\" install $PIP_STEP1"
    eval "\"$VENV/bin/pip\" install $PIP_STEP2"
}

PY=
for cand in "${E2E_PYTHON:-}" "$VENV/bin/python3" python3; do
    if [[ -n $cand ]] && command -v "$cand" >/dev/null && has_dgl "$cand"; then
        PY=$cand
        break
    fi
done
if [[ -z $PY && $INSTALL == 1 ]]; then
    install_deps
    has_dgl "$VENV/bin/python3" || {
        echo "FAIL: installed into $VENV but 'import dgl, torch' still fails:" >&2
        "$VENV/bin/python3" -c "import dgl, torch" 2>&1 | tail -n 5 >&2
        exit 1
    }
    PY=$VENV/bin/python3
fi
if [[ -z $PY ]]; then
    cat <<EOF

'python3 -c "import dgl, torch"' does not work here. To run this test, either:
  $0 --install
which installs them into a venv under $CACHE, or by hand:
  python3 -m venv $VENV
  $VENV/bin/pip install $PIP_STEP1
  $VENV/bin/pip install $PIP_STEP2
(PyPI's torch 2.2.1 wheel is the CUDA build, about 3 GB with its nvidia-* dependencies; it runs
on CPU. Set E2E_PYTHON to use another interpreter that has dgl and torch.)
EOF
    skip "dgl and torch are not installed"
fi
# An absolute interpreter path, so that every host (and torchrun) runs the same python.
PY=$("$PY" -c 'import sys; print(sys.executable)')
"$PY" -c 'import sys, dgl, torch; print(f"using {sys.executable}: dgl {dgl.__version__}, torch {torch.__version__}")' 2>/dev/null | tail -n 1

# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
if [[ -n ${E2E_BIN_DIR:-} ]]; then
    BUILD=0
fi
AGENT=${E2E_BIN_DIR:-$REPO/target/release}/dgl-agent
COORD=${E2E_BIN_DIR:-$REPO/target/release}/dgl-coord
if ((BUILD)); then
    section "Building dgl-agent and dgl-coord (release)"
    cargo build --release --bins
fi
for bin in "$AGENT" "$COORD"; do
    [[ -x $bin ]] || { echo "FAIL: $bin is missing (build it, or drop --no-build / E2E_BIN_DIR)" >&2; exit 1; }
done

# ---------------------------------------------------------------------------------------------
# Hosts: network namespaces on a bridge, each agent with its own /dev/shm
# ---------------------------------------------------------------------------------------------
PREFIX=dglrun-e2e-$$
NS_COORD=$PREFIX-c
NS_HOST=()
for ((m = 0; m < HOSTS; m++)); do NS_HOST+=("$PREFIX-h$m"); done
host_ip() { echo "$NET.$(($1 + 2))"; }

# shellcheck disable=SC2317 # (invoked by the trap)
cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    for pid in "${AGENT_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${AGENT_PIDS[@]}"; do
        for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    # Anything still living in our namespaces was started by this run: stop it by pid.
    for ns in "${NS_HOST[@]}" "$NS_COORD"; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    if ((KEEP)); then
        echo "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}

AGENT_PIDS=()
WORK=$(mktemp -d /tmp/dglrun-e2e.XXXXXX)
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Private copies: a rebuild during the run must not change the binaries under test.
mkdir -p "$WORK/bin"
cp "$AGENT" "$COORD" "$WORK/bin/"
AGENT=$WORK/bin/dgl-agent
COORD=$WORK/bin/dgl-coord
SRC=$WORK/src
TOKEN=$WORK/token

# Namespaces left by an earlier run that was killed before its cleanup (its pid is gone).
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^dglrun-e2e-[0-9]+-' || true); do
    pid=${ns#dglrun-e2e-}
    pid=${pid%%-*}
    if ! kill -0 "$pid" 2>/dev/null; then
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null && echo "removed stale namespace $ns"
    fi
done


section "Creating $HOSTS hosts: namespaces $PREFIX-h0..h$((HOSTS - 1)) on a bridge in $NS_COORD"
ip netns add "$NS_COORD"
ip -n "$NS_COORD" link set lo up
ip -n "$NS_COORD" link add br0 type bridge
ip -n "$NS_COORD" addr add "$NET.1/24" dev br0
ip -n "$NS_COORD" link set br0 up
for ((m = 0; m < HOSTS; m++)); do
    ns=${NS_HOST[m]}
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # The ip_config address is on eth0; a second interface, wan0 (a veth whose peer stays in
    # the namespace), carries the default route, as on a cluster node whose job network is
    # not its default one. Nobody passes GLOO_SOCKET_IFNAME: dgl-coord sets it per host.
    ip -n "$ns" link add eth0 type veth peer name "h$m" netns "$NS_COORD"
    ip -n "$ns" addr add "$(host_ip "$m")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$NS_COORD" link set "h$m" master br0
    ip -n "$NS_COORD" link set "h$m" up
    ip -n "$ns" link add wan0 type veth peer name wan1
    ip -n "$ns" addr add "10.254.$m.2/24" dev wan0
    ip -n "$ns" link set wan0 up
    ip -n "$ns" link set wan1 up
    ip -n "$ns" route add default dev wan0
    echo "host m$m: namespace $ns, eth0 $(host_ip "$m")/24, default route on wan0 10.254.$m.2/24"
done

head -c 32 /dev/urandom | base64 >"$TOKEN"
chmod 600 "$TOKEN"

section "Starting one dgl-agent per host, each with a private /dev/shm and /etc/hosts (logs in $WORK/agent-m*.log)"
# Each host's hostname resolves to a loopback address (Debian's default /etc/hosts): what
# gloo and tensorpipe bind to when nobody names their interface.
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$(hostname)" >"$WORK/hosts"
for ((m = 0; m < HOSTS; m++)); do
    mkdir -p "$WORK/root$m"
    # shellcheck disable=SC2016 # $@ is expanded by the inner sh
    ip netns exec "${NS_HOST[m]}" unshare --mount --propagation private \
        sh -c 'mount -t tmpfs -o size=2g tmpfs /dev/shm && mount --bind "$0" /etc/hosts && exec "$@"' "$WORK/hosts" \
        "$AGENT" --listen "$(host_ip "$m"):$AGENT_PORT" --root "$WORK/root$m" \
        --token-file "$TOKEN" --allow-root >"$WORK/agent-m$m.log" 2>&1 &
    AGENT_PIDS+=("$!")
done
for ((m = 0; m < HOSTS; m++)); do
    ip=$(host_ip "$m")
    for ((tries = 0; ; tries++)); do
        if ip netns exec "$NS_COORD" bash -c "</dev/tcp/$ip/$AGENT_PORT" 2>/dev/null; then
            echo "agent $ip:$AGENT_PORT is up (pid ${AGENT_PIDS[m]}, root $WORK/root$m)"
            break
        fi
        if ! kill -0 "${AGENT_PIDS[m]}" 2>/dev/null || ((tries >= 100)); then
            echo "FAIL: agent on $ip did not start; its log:" >&2
            tail -n 20 "$WORK/agent-m$m.log" >&2
            exit 1
        fi
        sleep 0.1
    done
done

# ---------------------------------------------------------------------------------------------
# Inputs: a real partition set, ip_config, the training script
# ---------------------------------------------------------------------------------------------
section "Partitioning a random graph of $NODES nodes into $HOSTS parts with dgl.distributed.partition_graph"
mkdir -p "$SRC/code"
if ! "$PY" "$E2E_DIR/partition_graph.py" --out "$SRC/data" --parts "$HOSTS" --graph-name "$GRAPH" \
    --nodes "$NODES" --method "$PART_METHOD" >"$WORK/partition.log" 2>&1; then
    tail -n 20 "$WORK/partition.log" >&2
    echo "FAIL: partition_graph.py failed" >&2
    exit 1
fi
grep -E '^(graph|partitioned|part [0-9]+ has [0-9]+ nodes)' "$WORK/partition.log" || true
for ((m = 0; m < HOSTS; m++)); do echo "$(host_ip "$m") $SERVER_PORT"; done >"$SRC/ip_config.txt"
cp "$E2E_DIR/train_dist.py" "$SRC/code/"
echo "ip_config.txt:"
sed 's/^/    /' "$SRC/ip_config.txt"

# dgl-coord runs in the coordinator's namespace, where the inputs are (the cwd carries over).
# PYTHONPATH is cleared: launch passes it on to every process, as DGL does.
coord() { (cd "$SRC" && ip netns exec "$NS_COORD" env -u PYTHONPATH "$COORD" "$@"); }

RESULTS=()  # one PASS/FAIL line per check, for the summary
PROBLEMS=() # what went wrong in the current check
FAILED=0
problem() {
    PROBLEMS+=("$1")
    echo "FAIL: $1" >&2
}
verdict() { # name, what a pass means
    if ((${#PROBLEMS[@]} == 0)); then
        RESULTS+=("PASS  $1: $2")
    else
        local more=""
        ((${#PROBLEMS[@]} > 1)) && more=" (and $((${#PROBLEMS[@]} - 1)) more problems, above)"
        RESULTS+=("FAIL  $1: ${PROBLEMS[0]}$more")
        FAILED=1
    fi
    PROBLEMS=()
}

# ---------------------------------------------------------------------------------------------
# dgl-coord copy
# ---------------------------------------------------------------------------------------------
section "dgl-coord copy"
copy_status=0
coord copy --workspace ws --rel_data_path data --part_config "$SRC/data/$GRAPH.json" \
    --ip_config "$SRC/ip_config.txt" --script_folder "$SRC/code" --token-file "$TOKEN" ||
    copy_status=$?
if ((copy_status != 0)); then
    problem "dgl-coord copy exited $copy_status"
    verdict copy ""
    printf '\n%s\n' "${RESULTS[@]}"
    exit 1
fi
for ((m = 0; m < HOSTS; m++)); do
    ws=$WORK/root$m/ws
    echo "files on m$m:"
    (cd "$ws" && find . -type f | sort | sed 's/^/    /')
    for f in ip_config.txt "data/$GRAPH.json" code/train_dist.py "data/part$m/graph.dgl" "data/part$m/node_feat.dgl"; do
        [[ -f $ws/$f ]] || problem "m$m lacks $f after the copy"
    done
    for ((o = 0; o < HOSTS; o++)); do
        ((o == m)) || [[ ! -e $ws/data/part$o ]] || problem "m$m got part$o"
    done
done
verdict copy "every host has ip_config, the part_config, the script and only its own partition"

# ---------------------------------------------------------------------------------------------
# dgl-coord launch, once per entry of RUNS
# ---------------------------------------------------------------------------------------------
# Process ids in host namespace m other than its agent's.
leftovers() {
    local m=$1 p out=()
    for p in $(ip netns pids "${NS_HOST[m]}" 2>/dev/null); do
        [[ $p == "${AGENT_PIDS[m]}" ]] || out+=("$p")
    done
    echo "${out[*]}"
}

# A process left on a host 10 s after WHAT ended: a problem.
check_leftovers() {
    local what=$1 m tries left
    for ((m = 0; m < HOSTS; m++)); do
        for ((tries = 0; tries < 50; tries++)); do
            left=$(leftovers "$m")
            [[ -z $left ]] && break
            sleep 0.2
        done
        if [[ -n $left ]]; then
            problem "processes left on m$m 10 s after $what: $(ps -o pid=,args= -p "${left// /,}" | cut -c1-150 | tr '\n' ';')"
        fi
    done
}

# An E2E_ERROR line in LOG, or a process left on a host 10 s after WHAT ended: a problem.
check_errors_and_leftovers() {
    local log=$1 what=$2
    if grep -q 'E2E_ERROR' "$log"; then
        problem "$(grep -m1 -o 'E2E_ERROR.*' "$log")"
    fi
    check_leftovers "$what"
}

# Rank R in LOG, its lines starting with LABEL ("[m0 trainer1] " under dgl-coord, "" under
# launch.py): it started with DGL's view of machine M (its ip_config address, so partition M)
# in a world of WORLD, printed a loss and finished.
check_rank() {
    local log=$1 r=$2 world=$3 m=$4 label=$5 line where=""
    if [[ -n $label ]]; then where=" labelled ${label% }"; fi
    line=$(grep -F "${label}E2E_START rank=$r " "$log" | head -n 1 || true)
    if [[ -z $line ]]; then
        problem "rank $r printed no E2E_START line$where"
        return
    fi
    if [[ $line != *" world=$world "* || $line != *" machine_ip=$(host_ip "$m") "* || $line != *" partition=$m "* ]]; then
        problem "rank $r: expected world=$world machine_ip=$(host_ip "$m") partition=$m, got: $line"
    fi
    grep -qF "${label}E2E_LOSS rank=$r " "$log" || problem "rank $r printed no loss line$where"
    grep -qF "${label}E2E_DONE rank=$r " "$log" || problem "rank $r did not finish (no E2E_DONE line$where)"
}

check_run() { # name mode trainers log status
    local name=$1 mode=$2 trainers=$3 log=$4 status=$5
    local world=$((HOSTS * trainers)) r m t label
    if ((status == 124)); then
        problem "dgl-coord launch did not finish within ${TIMEOUT}s (E2E_TIMEOUT); stopped it with SIGINT"
    elif ((status != 0)); then
        problem "dgl-coord launch exited $status"
    fi
    for ((r = 0; r < world; r++)); do
        # torchrun and direct mode both give the ranks of machine m as m*trainers + local rank.
        m=$((r / trainers))
        t=$((r % trainers))
        if [[ $mode == torchrun ]]; then label="m$m trainers"; else label="m$m trainer$t"; fi
        check_rank "$log" "$r" "$world" "$m" "[$label] "
    done
    # Nothing of the job may be left on any host: servers, trainers, torchrun's agent process
    # and the sampler processes the trainers forked.
    check_errors_and_leftovers "$log" "the job"
    local losses
    losses=$(grep -o 'E2E_LOSS rank=' "$log" | wc -l || true)
    verdict "$name" "$world trainers, $losses loss lines, dgl-coord exited 0, nothing left running"
}

n=0
for run in $RUNS; do
    IFS=: read -r mode trainers samplers <<<"$run"
    n=$((n + 1))
    name="launch $n: --trainer-mode $mode --num_trainers $trainers --num_samplers $samplers --num_servers 1"
    log=$WORK/launch-$n-$mode-t$trainers-s$samplers.log
    section "$name"
    # A hung job is stopped as a user would: SIGINT to dgl-coord, which stops it everywhere.
    set +e
    (cd "$SRC" && exec ip netns exec "$NS_COORD" env -u PYTHONPATH \
        timeout --foreground -s INT -k 60 "$TIMEOUT" "$COORD" launch \
        --workspace ws --num_trainers "$trainers" --num_samplers "$samplers" --num_servers 1 \
        --num_omp_threads 1 --part_config "data/$GRAPH.json" --ip_config ip_config.txt \
        --trainer-mode "$mode" --token-file "$TOKEN" \
        --extra_envs PYTHONUNBUFFERED=1 ${E2E_LAUNCH_FLAGS:-} \
        "$PY code/train_dist.py --graph_name $GRAPH --ip_config ip_config.txt --num_epochs 2 --max_steps 3 ${E2E_TRAIN_FLAGS:-}") \
        2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    failed_before=$FAILED
    FAILED=0
    check_run "$name" "$mode" "$trainers" "$log" "$status"
    if ((FAILED)); then
        echo "(log of this launch: $log)"
        echo "--- dgl-coord status after the failed launch:"
        coord status --ip_config ip_config.txt --token-file "$TOKEN" 2>&1 || true
        if [[ -n ${E2E_HOLD_ON_FAIL:-} ]]; then
            echo "holding the hosts for ${E2E_HOLD_ON_FAIL}s (E2E_HOLD_ON_FAIL): coordinator namespace $NS_COORD, token $TOKEN, work $WORK"
            sleep "$E2E_HOLD_ON_FAIL" || true
        fi
    fi
    FAILED=$((FAILED | failed_before))
done

# DGL's own launch.py, unmodified, with the ssh of `dgl-coord shims` first on PATH: the same
# job, started over the agents. launch.py reads ip_config and part_config from --workspace
# locally and runs `cd WORKSPACE; ...` on every host, whose shell starts in the agent's root:
# so it runs from machine 0's root with the workspace the copy made there. The interface
# variables are passed as its users pass them (--extra_envs takes every word up to the next
# option, hence not last); multiprocessing's "spawn" keeps launch.py's
# clean-up process from inheriting a thread's half-started ssh (README, "Tools that shell
# out to ssh").
if [[ ${E2E_LAUNCHPY:-1} == 1 ]]; then
    name="launch.py over the shims: DGL's own launch.py (torchrun, 1 trainer, 0 samplers, 1 server)"
    log=$WORK/launch-launchpy.log
    section "$name"
    [[ -f $DGL_TOOLS/launch.py ]] || { echo "FAIL: no launch.py in $DGL_TOOLS (set DGL_TOOLS)" >&2; exit 1; }
    coord shims --dir "$WORK/shims" --token-file "$TOKEN" --agent-port "$AGENT_PORT" >/dev/null
    started=$SECONDS
    set +e
    (cd "$WORK/root0" && exec ip netns exec "$NS_COORD" env -u PYTHONPATH PATH="$WORK/shims:$PATH" \
        timeout --foreground -s INT -k 60 "$TIMEOUT" "$PY" -c \
        "import multiprocessing as m, runpy, sys; m.set_start_method('spawn'); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
        "$DGL_TOOLS/launch.py" --workspace ws --num_trainers 1 --num_samplers 0 --num_servers 1 \
        --extra_envs GLOO_SOCKET_IFNAME=eth0 TP_SOCKET_IFNAME=eth0 PYTHONUNBUFFERED=1 \
        --num_omp_threads 1 --part_config "data/$GRAPH.json" --ip_config ip_config.txt \
        "$PY code/train_dist.py --graph_name $GRAPH --ip_config ip_config.txt --num_epochs 2 --max_steps 3") \
        2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    took=$((SECONDS - started))
    if ((status == 124)); then
        problem "launch.py did not finish within ${TIMEOUT}s (E2E_TIMEOUT); stopped it with SIGINT"
    elif ((status != 0)); then
        problem "launch.py exited $status"
    fi
    # One trainer a host: rank m runs on machine m (launch.py's node rank), unlabelled.
    for ((r = 0; r < HOSTS; r++)); do
        check_rank "$log" "$r" "$HOSTS" "$r" ""
    done
    check_errors_and_leftovers "$log" "launch.py"
    losses=$(grep -o 'E2E_LOSS rank=' "$log" | wc -l || true)
    ((${#PROBLEMS[@]} == 0)) || echo "(log of this launch: $log)"
    verdict "$name" "$HOSTS trainers, $losses loss lines, launch.py exited 0 after ${took}s, nothing left running"
fi

# The control: the same job with dglrun's interface variables emptied (gloo then falls back to
# the hostname, a loopback address) must fail or hang; the runs above show dglrun's fix.
if [[ ${E2E_CONTROL:-1} == 1 ]]; then
    name="control: torchrun:1:0 with GLOO_SOCKET_IFNAME and TP_SOCKET_IFNAME emptied"
    log=$WORK/launch-control.log
    section "$name"
    control_timeout=${E2E_CONTROL_TIMEOUT:-120}
    set +e
    (cd "$SRC" && exec ip netns exec "$NS_COORD" env -u PYTHONPATH \
        timeout --foreground -s INT -k 60 "$control_timeout" "$COORD" launch \
        --workspace ws --num_trainers 1 --num_samplers 0 --num_servers 1 \
        --num_omp_threads 1 --part_config "data/$GRAPH.json" --ip_config ip_config.txt \
        --token-file "$TOKEN" \
        --extra_envs GLOO_SOCKET_IFNAME= TP_SOCKET_IFNAME= NCCL_SOCKET_IFNAME= PYTHONUNBUFFERED=1 \
        "$PY code/train_dist.py --graph_name $GRAPH --ip_config ip_config.txt --num_epochs 2 --max_steps 3") \
        >"$log" 2>&1
    status=$?
    set -e
    if ((status == 0)); then
        problem "the job passed without dglrun's interface variables: the hosts do not show the problem"
    fi
    check_leftovers "the control run"
    verdict "$name" "failed or hung as expected (exit $status, log $log), nothing left running"
fi

section "Summary"
printf '%s\n' "${RESULTS[@]}"
if ((FAILED)); then
    if ((KEEP)); then
        echo "e2e-real-dgl: FAIL (logs in $WORK)"
    else
        echo "e2e-real-dgl: FAIL (rerun with --keep to keep the logs and the agents' roots)"
    fi
    exit 1
fi
echo "e2e-real-dgl: PASS"
