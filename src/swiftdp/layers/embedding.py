"""Layer rules: embedding (to be filled)."""
