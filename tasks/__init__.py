"""Pipeline steps: one module a step, each a Prefect task around a plain typed function."""
