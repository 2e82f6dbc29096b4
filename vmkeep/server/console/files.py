"""File-level restore: browse a point's filesystems, search by name, download."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
