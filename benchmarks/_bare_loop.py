"""The baseline: the least work that reads every page of every resource.

One keep-alive ``requests.Session``; every paginated resource with ``limit=100``,
``order=asc`` and ``startingAfter`` = the last id until ``hasMore`` is false; contact fields in
one request without parameters; each body JSON-parsed and dropped. Nothing else: no
validation, no staging, no retries, no rate-limit pacing. Deliberately independent of
``mkt_assets`` so the baseline cannot inherit the project's costs.

Usage: MKT_API_KEY=... python benchmarks/_bare_loop.py BASE_URL
Prints one line ``BENCH_JSON {...}`` with the seconds per resource.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import requests

# (name, path, paginated): every resource, in the catalog's order.
RESOURCES: tuple[tuple[str, str, bool], ...] = (
    ("communities", "/community/communities", True),
    ("contacts", "/contacts", True),
    ("tags", "/tags", True),
    ("contact_fields", "/contact_fields", False),
    ("course_resources", "/school/courses", True),
    ("memberships", "/community/memberships", True),
    ("enrollments", "/school/enrollments", True),
)
PAGE_SIZE = 100


def read_resource(session: requests.Session, base_url: str, path: str, paginated: bool) -> tuple[int, int]:
    """Read every page of one resource; return (pages, records)."""
    params: dict[str, object] | None = {"limit": PAGE_SIZE, "order": "asc"} if paginated else None
    pages = records = 0
    while True:
        response = session.get(base_url + path, params=params, timeout=(10, 60))
        response.raise_for_status()
        body = json.loads(response.content)
        pages += 1
        items = body["items"]
        if not paginated:
            return pages, len(items)
        records += len(items)
        if not body["hasMore"]:
            return pages, records
        params = {"limit": PAGE_SIZE, "order": "asc", "startingAfter": items[-1]["id"]}


def main(base_url: str) -> dict[str, object]:
    session = requests.Session()
    session.headers.update({"X-API-Key": os.environ["MKT_API_KEY"], "Accept": "application/json"})
    per_resource: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for name, path, paginated in RESOURCES:
        resource_started = time.perf_counter()
        pages, records = read_resource(session, base_url.rstrip("/"), path, paginated)
        per_resource[name] = {
            "seconds": time.perf_counter() - resource_started,
            "pages": pages,
            "records": records,
        }
    total = time.perf_counter() - started
    session.close()
    return {
        "seconds": total,
        "resources": per_resource,
        # ru_maxrss is the peak resident set in kB on Linux.
        "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


if __name__ == "__main__":
    print("BENCH_JSON " + json.dumps(main(sys.argv[1])), flush=True)
