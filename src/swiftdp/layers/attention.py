"""Layer rules: attention (to be filled)."""
