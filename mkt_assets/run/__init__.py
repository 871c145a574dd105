"""A sync from plan to write (fetch every resource, stage, then one transaction), knowing
nothing of Dagster."""
