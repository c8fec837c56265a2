"""sgdgeom."""
