"""PFG scripts library: one concept per module (see README.md for the map)."""
