"""Talking to the master's REST API from the command line: a bearer token per server, kept in
the user's config directory (0600) after `vmkeep --server URL login`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx

from vmkeep.errors import UsageError, VmkeepError

TIMEOUT_SECONDS = 120


def token_file() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "vmkeep" / "tokens.json"


def _tokens() -> dict[str, str]:
    path = token_file()
    return json.loads(path.read_text()) if path.exists() else {}


def save_token(server: str, token: str) -> None:
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = {**_tokens(), server: token}
    path.touch(mode=0o600)
    path.write_text(json.dumps(tokens, indent=1))


class ApiClient:
    def __init__(self, server: str) -> None:
        self.server = server.rstrip("/")
        token = os.environ.get("VMKEEP_TOKEN") or _tokens().get(self.server)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=TIMEOUT_SECONDS)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer; an error answer becomes a VmkeepError that says what to do."""
        try:
            reply = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise VmkeepError(f"cannot reach the vmkeep server at {self.server}: {exc}") from None
        if reply.status_code == 401:
            raise UsageError(f"not logged in to {self.server} (or the token expired): run "
                             f"`vmkeep --server {self.server} login NAME`")
        if reply.status_code >= 400:
            try:
                detail = reply.json().get("detail", reply.text)
            except ValueError:
                detail = reply.text
            raise VmkeepError(f"the server refused ({reply.status_code}): {detail}")
        return reply.json() if reply.content else None
