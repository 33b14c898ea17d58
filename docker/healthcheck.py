"""Container health check: exit 0 when the service's /readyz answers 200, else 1.

Images run it as their HEALTHCHECK; it reads the port the service really binds
(BINLOOP_HTTP_PORT) so a changed port does not turn every container unhealthy.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("BINLOOP_HTTP_PORT", "8000")
    path = sys.argv[1] if len(sys.argv) > 1 else "/readyz"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{path} on port {port}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
