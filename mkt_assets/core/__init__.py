"""What the API holds and what can go wrong, declared once: the catalog of resources, the
errors a user can act on, and the check of every record against the catalog. Pure data:
every other layer reads it, it reads none."""
