"""Ready-made resources for real backends; one module per backend, each an extra."""
