"""Layer rules: conv (to be filled)."""
