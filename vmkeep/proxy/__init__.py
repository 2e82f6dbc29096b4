"""Proxies (data movers): procrastinate workers that run the backups the master dispatches."""
