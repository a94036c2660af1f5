#!/usr/bin/env bash
# Makes a private CA and certificates for mutual TLS between dgl-coord and dgl-agent.
#
#   scripts/make-certs.sh OUT_DIR HOST [HOST...]
#
# HOST is an agent's address as it appears in ip_config.txt (an IP, or a DNS name).
# Writes OUT_DIR/ca.pem (give to every agent and to dgl-coord as --tls-ca),
# OUT_DIR/agent-HOST.{pem,key} (that agent's --tls-cert/--tls-key) and
# OUT_DIR/coordinator.{pem,key} (dgl-coord's --tls-cert/--tls-key).
# Keep ca.key offline: whoever holds it can mint certificates the agents accept.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 OUT_DIR HOST [HOST...]" >&2
    exit 2
fi
out=$1
shift
mkdir -p "$out"
umask 077

days=${DGLRUN_CERT_DAYS:-825}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$out/ca.key" -out "$out/ca.pem" -days "$days" \
    -subj "/CN=dglrun cluster CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() { # name subject-alt-name extended-key-usage
    local name=$1 san=$2 eku=$3
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$out/$name.key" -out "$out/$name.csr" -subj "/CN=$name" 2>/dev/null
    openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
        -CAcreateserial -out "$out/$name.pem" -days "$days" \
        -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$san" "$eku") \
        2>/dev/null
    rm -f "$out/$name.csr"
}

for host in "$@"; do
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then
        san="IP:$host"
    else
        san="DNS:$host"
    fi
    issue "agent-$host" "$san" serverAuth
done
issue coordinator "DNS:dgl-coord" clientAuth
rm -f "$out/ca.srl"
echo "wrote $out/ca.pem, $out/coordinator.{pem,key} and agent certificates for: $*"
