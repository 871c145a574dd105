"""DuckDB only: opening the file, reading staged pages, the merge and its history, the
normalized tables, the bookkeeping tables (_mkt_*), the facts the checks need, and the run's one
transaction. Nothing of HTTP or Dagster."""
