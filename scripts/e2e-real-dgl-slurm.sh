#!/usr/bin/env bash
# Opt-in: a real DGL job submitted with sbatch through deploy/slurm/dglrun.sbatch, on a real
# Slurm cluster of 3 nodes on this machine (integration-tests/fixtures/real-slurm.sh: every
# slurmd in a network namespace of its own, with its own /dev/shm). Partitions a small random
# graph with dgl.distributed.partition_graph; the job copies it and trains (DistGraph,
# DistNodeDataLoader, GraphSAGE, DDP over gloo, a few steps) with integration-tests/e2e's
# scripts; then checks that the job COMPLETED, that every rank trained on its machine's
# partition, and that nothing is left on the nodes.
#
# Usage: sudo scripts/e2e-real-dgl-slurm.sh
# Environment: E2E_PYTHON (python with dgl and torch; default the venv of e2e-real-dgl.sh,
# which --install fills), E2E_BIN_DIR (dgl-agent and dgl-coord; default target/release, built
# here), E2E_NODES (graph size, default 4000), RS_NO_INSTALL=1 (Slurm and munge are already
# installed: no apt-get).
# Without dgl/torch it says so and exits 0 with SKIP, like e2e-real-dgl.sh.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
E2E_DIR=$REPO/integration-tests/e2e
VENV=${XDG_CACHE_HOME:-$HOME/.cache}/dglrun-e2e/venv
HOSTS=3
GRAPH=e2e

skip() {
    printf '\nSKIP: %s\n' "$*"
    exit 0
}
fail() {
    echo "e2e-real-dgl-slurm: FAIL: $*" >&2
    exit 1
}

[[ $(id -u) == 0 ]] || skip "needs root for the Slurm cluster's namespaces (run it with sudo)"
PY=
for cand in "${E2E_PYTHON:-}" "$VENV/bin/python3" python3; do
    if [[ -n $cand ]] && command -v "$cand" >/dev/null && "$cand" -c "import dgl, torch" 2>/dev/null; then
        PY=$cand
        break
    fi
done
[[ -n $PY ]] || skip "dgl and torch are not installed (scripts/e2e-real-dgl.sh --install installs them)"
PY=$("$PY" -c 'import sys; print(sys.executable)')

if [[ -z ${E2E_BIN_DIR:-} ]]; then
    cargo build --release --bins
fi
BIN_DIR=${E2E_BIN_DIR:-$REPO/target/release}
for b in dgl-agent dgl-coord; do
    [[ -x $BIN_DIR/$b ]] || fail "$BIN_DIR/$b is missing"
done

WORK=$(mktemp -d /tmp/dglrun-e2e-slurm.XXXXXX)
D=""
# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $D ]]; then bash "$REPO/integration-tests/fixtures/real-slurm.sh" down "$D" || status=1; fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A block of its own: 198.18.253.0/24 (the integration tests' cluster uses .255).
D=$(RS_PREFIX="e2s$$" RS_SUBNET=253 bash "$REPO/integration-tests/fixtures/real-slurm.sh" up "$HOSTS")
export SLURM_CONF=$D/slurm.conf

echo "===== partitioning a random graph into $HOSTS parts"
mkdir -p "$WORK/code"
"$PY" "$E2E_DIR/partition_graph.py" --out "$WORK/data" --parts "$HOSTS" --graph-name "$GRAPH" \
    --nodes "${E2E_NODES:-4000}" --method metis >"$WORK/partition.log" 2>&1 ||
    { tail -n 20 "$WORK/partition.log" >&2; fail "partition_graph.py failed"; }
cp "$E2E_DIR/train_dist.py" "$WORK/code/"

echo "===== sbatch deploy/slurm/dglrun.sbatch"
# The environment reaches every DGL process through srun and the agents.
job=$(cd "$WORK" && env -u PYTHONPATH \
    DGLRUN_BIN_DIR="$BIN_DIR" DGLRUN_ROOT_BASE="$WORK/base" DGL_AGENT_ALLOW_ROOT=true \
    DGLRUN_PART_CONFIG="$WORK/data/$GRAPH.json" DGLRUN_SCRIPT_FOLDER="$WORK/code" \
    DGLRUN_NUM_TRAINERS=1 DGLRUN_NUM_SAMPLERS=0 \
    GLOO_SOCKET_IFNAME=eth0 TP_SOCKET_IFNAME=eth0 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 \
    sbatch --parsable --nodes="$HOSTS" --time=10 --output="$WORK/out-%j.txt" \
    "$REPO/deploy/slurm/dglrun.sbatch" \
    "$PY code/train_dist.py --graph_name $GRAPH --ip_config ip_config.txt --num_epochs 2 --max_steps 3")
state=""
for _ in $(seq 1200); do
    state=$(scontrol show job "$job" -o | sed -n 's/.* JobState=\([^ ]*\).*/\1/p')
    case $state in PENDING | CONFIGURING | RUNNING | COMPLETING | "") sleep 0.5 ;; *) break ;; esac
done
out=$WORK/out-$job.txt
cat "$out"

problems=()
[[ $state == COMPLETED ]] || problems+=("job $job ended $state")
for ((r = 0; r < HOSTS; r++)); do
    ip=198.18.253.1$((r + 1))
    line=$(grep -F "[m$r trainers] E2E_START rank=$r " "$out" | head -n 1 || true)
    [[ $line == *" machine_ip=$ip "* && $line == *" partition=$r "* ]] ||
        problems+=("rank $r: expected machine_ip=$ip partition=$r, got: ${line:-nothing}")
    grep -qF "[m$r trainers] E2E_DONE rank=$r " "$out" || problems+=("rank $r did not finish")
done
leftovers() { # what runs on the nodes but slurmd
    local ns p
    for ns in $(ip netns list | awk '{print $1}' | grep "^e2s$$n"); do
        for p in $(ip netns pids "$ns"); do
            [[ $(cat "/proc/$p/comm" 2>/dev/null) == slurmd ]] || echo "$ns:$p:$(cat "/proc/$p/comm" 2>/dev/null)"
        done
    done
}
for _ in $(seq 100); do
    left=$(leftovers)
    [[ -n $left ]] || break
    sleep 0.1
done
[[ -z $left ]] || problems+=("left on the nodes 10 s after the job: $left")
if ((${#problems[@]})); then
    printf 'FAIL: %s\n' "${problems[@]}"
    fail "${#problems[@]} problems"
fi
echo "e2e-real-dgl-slurm: PASS (a real DGL job, $HOSTS trainers on $HOSTS Slurm nodes, COMPLETED)"
