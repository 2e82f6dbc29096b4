"""Server-side pagination for the console's lists: a catalog of 10,000 VMs and a million points
is never read whole to draw one page."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlencode

from fastapi import Query

PER_PAGE = 50
MAX_PER_PAGE = 200


@dataclass
class Paging:
    """Which slice of a list a page shows; ``total`` is filled in once the list is counted."""

    number: int = 1
    per_page: int = PER_PAGE
    total: int = 0
    filters: dict[str, str] = field(default_factory=dict)  # kept in the links to other pages

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.per_page

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    def link(self, number: int) -> str:
        """The query string of page ``number`` with the same filters."""
        shown = {k: v for k, v in self.filters.items() if v}
        return "?" + urlencode({**shown, "page": number, **({"per_page": self.per_page}
                                                             if self.per_page != PER_PAGE else {})})


def paging(page: int = Query(1, ge=1, le=1_000_000), per_page: int = Query(PER_PAGE, ge=1, le=MAX_PER_PAGE)) -> Paging:
    """The ``page`` and ``per_page`` query parameters of a list page (a FastAPI dependency)."""
    return Paging(page, per_page)
