"""A run's write whose checks' facts then fail, as when their queries run out of memory.

Imported by the lean DuckDB worker, so it imports no Dagster (see lean_process)."""

from __future__ import annotations

from dataclasses import replace

from mkt_assets.warehouse.commit import CommitRequest, Facts, RunCommit, commit


def commit_then_fail_the_facts(request: CommitRequest) -> RunCommit:
    # Gathered with the commit, then replaced by the failure: none left gathering after it.
    committed = commit(replace(request, facts_after=False))
    return replace(committed, facts=Facts(error="Out of Memory Error: failed to pin block of size 256.0 KiB"))
