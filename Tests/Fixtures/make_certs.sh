#!/bin/sh
# Test PKI: make_certs.sh DIR NAME [NAME...]
# Writes DIR/ca.crt (+ ca.key) and, for each NAME, DIR/NAME.crt and DIR/NAME.key: an ECDSA P-256 leaf signed by
# the CA with NAME as its DNS SAN (NAME may be a wildcard such as *.example.test; its files are then named
# wildcard.example.test.*). A NAME spiffe://TD/ns/NS/sa/SA gets that URI SAN instead, in files spiffe-SA.*.
# Also DIR/other-ca.crt: a CA that signed none of them.
set -eu
dir=$1; shift
mkdir -p "$dir"
cd "$dir"
gen() { openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=$1" \
    -keyout "$2.key" -out "$2.crt" -addext basicConstraints=critical,CA:TRUE 2>/dev/null; }
gen "Sluice Test CA" ca
gen "Some Other CA" other-ca
for name in "$@"; do
    case "$name" in
        spiffe://*) file="spiffe-${name##*/}"; san="URI:$name"; cn="${name##*/}" ;;
        *) file=$(echo "$name" | sed 's/^\*/wildcard/'); san="DNS:$name"; cn="$name" ;;
    esac
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$cn" \
        -keyout "$file.key" -out "$file.csr" 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" > "$file.ext"
    openssl x509 -req -in "$file.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile "$file.ext" \
        -out "$file.crt" 2>/dev/null
    rm -f "$file.csr" "$file.ext"
done
chmod 600 ./*.key
