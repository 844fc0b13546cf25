"""Layer rules: recurrent (to be filled)."""
