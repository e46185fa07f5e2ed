"""Built-in model references (``builtin:NAME`` in recipes)."""
