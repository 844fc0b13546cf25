"""Layer rules: norm (to be filled)."""
