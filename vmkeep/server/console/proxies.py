"""Proxies: registration, heartbeats, transports, reach, load."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
