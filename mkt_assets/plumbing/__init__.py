"""Process and file plumbing under the layers above: private files and directories (0700,
0600, no symlinks followed) and the lean worker process that runs DuckDB without Dagster."""
