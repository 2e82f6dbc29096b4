"""Talking to the master's REST API from the command line: a bearer token per server, kept in
the user's config directory (0600) after `vmkeep --server URL login`."""

from __future__ import annotations

import json
import os
import ssl
import tempfile
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
    """Add ``token`` to the store."""
    _write_tokens({**_tokens(), server: token})


def forget_token(server: str) -> bool:
    """Drop ``server``'s token from the store (after logging out); whether there was one."""
    tokens = _tokens()
    if tokens.pop(server.rstrip("/"), None) is None:
        return False
    _write_tokens(tokens)
    return True


def _write_tokens(tokens: dict[str, str]) -> None:
    """The new content goes into a file created 0600 and then takes the store's place: never
    readable by others, even for a moment, even if the old store was."""
    path = token_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # O_EXCL, mode 0600
    staging = Path(name)
    try:
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)  # whatever the umask
            out.write(json.dumps(tokens, indent=1))
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def server_verify(ca_file: Path | None) -> ssl.SSLContext | bool:
    """httpx's ``verify`` for a vmkeep server: its CA from ``ca_file``, else the system's."""
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--ca-file {ca_file}: cannot load CA certificates from it ({exc}); give the PEM file "
                         "of the CA that signed the server's certificate") from exc


def read_token(token_file: Path | None) -> str:
    """A proxy's API token, from ``token_file`` or VMKEEP_TOKEN: never the command line, which
    every user of the machine can read (ps, /proc)."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"--token-file {token_file}: {exc.strerror}") from exc
        if not token:
            raise UsageError(f"--token-file {token_file} is empty: put the proxy account's API token in it")
        return token
    from vmkeep.settings import secret, settings

    token = (secret(settings().token) or "").strip()
    if not token:
        raise UsageError("give the proxy account's API token in VMKEEP_TOKEN or a file named by --token-file")
    return token


class ApiClient:
    def __init__(self, server: str, ca_file: Path | None = None, token: str | None = None) -> None:
        """A client with ``token``, else VMKEEP_TOKEN, else the one `vmkeep login` stored."""
        self.server = server.rstrip("/")
        from vmkeep.settings import secret, settings

        token = token or secret(settings().token) or _tokens().get(self.server)
        self.ca_file = ca_file
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=TIMEOUT_SECONDS,
                                 verify=server_verify(ca_file))

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
