#!/usr/bin/env python3
"""Container healthcheck: exit 0 when ``URL`` answers 2xx, else 1.

Usage: fedabus-healthcheck URL [--ca CA_CERT]

``--ca`` verifies an HTTPS server against that CA certificate (the consortium CA from ``fedabus certs``).
Standard library only, so it runs in every fedabus image without extra packages.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedabus-healthcheck", allow_abbrev=False)
    parser.add_argument("url")
    parser.add_argument("--ca", help="CA certificate (PEM) that signed the server's certificate")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    args = parser.parse_args(argv)
    context = ssl.create_default_context(cafile=args.ca) if args.ca else None
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout, context=context) as response:
            healthy = 200 <= response.status < 300
    except (OSError, urllib.error.URLError) as error:
        print(f"unhealthy: {args.url}: {error}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
