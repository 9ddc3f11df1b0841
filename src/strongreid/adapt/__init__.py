"""Learning from a user's own footage without identity labels (pseudo-identities by clustering)."""
