"""A user's own model package, imported by the exporter from ``--code-path``."""
