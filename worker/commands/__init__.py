"""The worker's CLI commands (analysis, stages, phantoms, training)."""
