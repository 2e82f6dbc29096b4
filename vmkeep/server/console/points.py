"""Restore points per VM and the restore wizard."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
