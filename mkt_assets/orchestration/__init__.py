"""The Dagster layer: the resource and its settings, the assets, the IO manager, the checks,
the schedules and the run retries. The only layer that imports Dagster."""
