"""Writes the Grafana dashboards binloop.observability.dashboards builds to deploy/grafana/.

Run it after changing a panel: `python tools/make_dashboards.py` (a test fails while the
shipped JSON differs from what the code builds).
"""

from __future__ import annotations

import sys
from pathlib import Path

from binloop.observability.dashboards import write_all

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards"


def main() -> int:
    for path in write_all(DASHBOARD_DIR):
        print(path.relative_to(DASHBOARD_DIR.parent.parent.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
