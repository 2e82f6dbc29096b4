"""The repository: content-addressed, deduplicated, compressed and encrypted chunk store."""
