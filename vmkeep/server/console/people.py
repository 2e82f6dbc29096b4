"""The audit log (admin, auditor) and users and tokens (admin)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
