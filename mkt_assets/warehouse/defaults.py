"""The warehouse's default settings, importable without DuckDB: the settings read them, and so
does the component's model, which dg imports in every project of an environment that has this
package installed (its registry describes each component type): describing it must not cost
DuckDB's import."""

# How long, at most, one opening of the file waits for others to let go of it: our own
# writers queue on the lock file, a DuckDB session opened by hand holds DuckDB's own lock.
DEFAULT_WAIT_SECONDS = 300.0

# DuckDB may use this much memory before it spills to `<database>.tmp`: a sync's memory
# stays bounded however large the account. A merge of 100k contacts needs about 105 MB, so
# this cap leaves it whole and holds a million to 216 MB of worker (273 MB under 192MB),
# for about 1 s more of spilling (first load 9.3 s against 8.5 s).
DEFAULT_MEMORY_LIMIT = "128MB"

# The share of a table's live rows a complete read may mark gone unconfirmed (the row count
# check's MKT_ROW_COUNT_MAX_DROP). Never every live row.
DEFAULT_MAX_DROP = 0.1
