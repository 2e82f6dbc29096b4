"""The `vmkeep` command."""
