#!/bin/sh
# One-shot, run by the coordinator: register each site's public key with the SuperLink (idempotent).
# Usage: register-sites.sh SITE...
# Writes the "demo" connection into $FLWR_HOME/config.toml; reads $CREDENTIALS_DIR/sites/SITE/SITE.pub.
set -eu
: "${FLWR_HOME:?FLWR_HOME must be set}"
dir="${CREDENTIALS_DIR:-/certs}"
address="${SUPERLINK_ADDRESS:-superlink:8000}"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "demo"

[superlink.demo]
address = "$address"
root-certificates = "$dir/ca.crt"
TOML
for site in "$@"; do
    # `flwr supernode register` exits 1 on failure in its default output format (not with --format json).
    if output=$(flwr supernode register "$dir/sites/$site/$site.pub" demo --name "$site" 2>&1); then
        echo "registered $site"
    elif printf '%s' "$output" | grep -q "already in use"; then
        echo "$site was already registered"
    else
        printf '%s\n' "$output" >&2
        exit 1
    fi
done
flwr supernode list demo
