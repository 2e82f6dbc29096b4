"""The master's catalog: what the repositories hold, in PostgreSQL, for fast listing and search.

The repositories stay the source of truth for restore points; the catalog can always be rebuilt
from them (``vmkeep catalog rebuild``).
"""
