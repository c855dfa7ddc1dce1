"""Qt dock widgets (the only place in the project that imports Qt)."""
