"""Inventory: hypervisors, hosts and VMs as a tree, with filters, search and the protect action."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
