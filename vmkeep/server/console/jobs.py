"""Jobs: the history with filters, and one job's VMs and disks with live progress."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
