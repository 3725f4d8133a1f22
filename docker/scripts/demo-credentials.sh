#!/bin/sh
# One-shot: make the demo consortium's credentials in $CREDENTIALS_DIR (default /certs) unless they exist.
# Usage: demo-credentials.sh SITE...
# The SuperLink certificate names superlink and fleet-proxy (the compose service names) besides loopback.
set -eu
dir="${CREDENTIALS_DIR:-/certs}"
if [ -f "$dir/ca.crt" ]; then
    echo "credentials already in $dir; keeping them"
    exit 0
fi
count=$#
for site in "$@"; do
    set -- "$@" --site "$site"
done
shift "$count"
exec fedabus certs --out "$dir" --server-name superlink --server-name fleet-proxy "$@"
