"""Dagster's run retries for the sync: a failed run is launched again by the daemon, later, and
only if running it again can mend what failed.

Dagster 1.13 retries runs from its daemon (the EVENT_LOG_CONSUMER that ``dg dev``, ``dagster
dev`` and ``dagster-daemon run`` start once dagster.yaml enables ``run_retries``). As a run's
failure is stored, the instance tags the run ``dagster/will_retry`` from its
``dagster/max_retries`` tag (else the instance's ``max_retries``) and the number of runs in its
group; the daemon then launches a copy of each run tagged true, at once. Two things it does not
do are done here:

- It retries any failure: ``dg.Failure(allow_retries=False)`` governs op retry policies only.
  So the step's failure hook, which runs before the run's failure is stored, sets the run's own
  ``dagster/max_retries`` to 0 when a retry cannot mend the error, and the instance reads that
  as it decides.
- It has no delay. So a run launched as a retry (``dagster/retry_number``) waits, before its
  first request, until ``MKT_RUN_RETRY_DELAY_SECONDS`` after the failed run ended, doubled for
  each retry after the first: an outage has minutes to pass, and a longer one longer waits.

A run the user terminates ends Canceled, which Dagster never retries.
"""

from __future__ import annotations

import time

import dagster as dg

from mkt_assets.core.errors import is_retriable
from mkt_assets.orchestration.settings import Settings
from mkt_assets.run.sync import FetchFailed

# Dagster's run tags (``dagster._core.storage.tags``), as documented for run retries.
MAX_RETRIES_TAG = "dagster/max_retries"
RETRY_STRATEGY_TAG = "dagster/retry_strategy"
RETRY_NUMBER_TAG = "dagster/retry_number"
# The run whose failure set dagster/max_retries to 0. A run re-executed from it (the UI's
# Re-execute copies the tags) carries it too, and gets back the job's own number of retries.
NOT_RETRIED_TAG = "mkt_assets/not_retried_after"
# No single wait longer: a run that has waited this long should rather fail and say why.
MAX_RETRY_DELAY_SECONDS = 1800.0


def run_retry_tags(settings: Settings) -> dict[str, str]:
    """The run tags of the jobs: how many retries, each running the whole sync again (one step,
    which resumes what the failed run fetched), not Dagster's default "from failure", which has
    nothing to run when the step itself succeeded and the run died after it."""
    return {MAX_RETRIES_TAG: str(settings.run_retries), RETRY_STRATEGY_TAG: "ALL_STEPS"}


def retry_delay(settings: Settings, retry_number: int) -> float:
    """How long after the failed run's end retry ``retry_number`` (1, 2, ...) starts reading."""
    return min(settings.run_retry_delay_seconds * 2 ** max(retry_number - 1, 0), MAX_RETRY_DELAY_SECONDS)


def can_mend(error: BaseException | None) -> bool:
    """Whether running the sync again may succeed where ``error`` failed it. The step's
    ``dg.Failure(allow_retries=False)`` (no key, an unusable DuckDB file, a mass deletion
    refused) says it cannot; the project's own errors say which they are (``errors``)."""
    if error is None:
        return True
    if isinstance(error, dg.Failure):
        return error.allow_retries
    return is_retriable(error)


@dg.failure_hook(name="mkt_no_retry_that_cannot_mend")
def no_retry_that_cannot_mend(context: dg.HookContext) -> None:
    """Keep the daemon from retrying a failure that would only fail again the same way."""
    error = context.op_exception
    if can_mend(error):
        return
    context.instance.add_run_tags(context.run_id, {MAX_RETRIES_TAG: "0", NOT_RETRIED_TAG: context.run_id})
    context.log.info(
        f"Not retried automatically: running the sync again would fail the same way ({_named(error)})."
        " Do what the error says, then launch the sync again."
    )


def _named(error: BaseException | None) -> str:
    """``contacts: ApiAuthError``: the failures a retry cannot mend, by resource, never their values."""
    if isinstance(error, FetchFailed):
        return ", ".join(f"{name}: {type(failed).__name__}" for name, failed in error.failures.items() if not can_mend(failed))
    return type(error).__name__


def retry_wait_reason(settings: Settings, delay: float) -> str:
    """Why a retry waits ``delay`` seconds, naming the setting where its reader can set it."""
    setting = settings.setting_names.run_retry_delay
    return (
        f"{delay:g} s after it failed ({f'{setting} = ' if setting else ''}{settings.run_retry_delay_seconds:g},"
        " doubled for each retry after the first), so that what failed it has time to pass"
    )


def before_the_run(context: dg.AssetExecutionContext, settings: Settings) -> None:
    """What the step does first: a run re-executed from one not to be retried is retried like
    any other; a run launched as a retry waits for the outage that failed its parent to pass."""
    run = context.run
    refused_by = run.tags.get(NOT_RETRIED_TAG)
    if refused_by is not None and refused_by != run.run_id:
        context.instance.add_run_tags(run.run_id, {MAX_RETRIES_TAG: context.job_def.run_tags.get(MAX_RETRIES_TAG, "0")})
    number = run.tags.get(RETRY_NUMBER_TAG)
    if number is None or not number.isdigit():
        return
    delay = retry_delay(settings, int(number))
    parent = context.instance.get_run_record_by_id(run.parent_run_id) if run.parent_run_id else None
    ended = parent.end_time if parent is not None and parent.end_time is not None else time.time()
    remaining = ended + delay - time.time()
    why = retry_wait_reason(settings, delay)
    if remaining <= 0:
        context.log.info(f"Automatic retry {number} of run {run.parent_run_id}: starting at once, past {why}.")
        return
    context.log.info(
        f"Automatic retry {number} of run {run.parent_run_id}: waiting {remaining:.0f} s before the first request,"
        f" until {why}."
    )
    # Terminate interrupts the wait like any other part of the step.
    time.sleep(remaining)
