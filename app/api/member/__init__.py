"""Mini-program endpoints, authenticated by a member token: a member sees only their own data."""
