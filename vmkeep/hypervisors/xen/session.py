"""A XenAPI (XAPI) session: where to connect, the login (following a pool member to its master),
certificate checks, and one ``call`` that every XAPI request of the connector goes through.

Calls go through the official ``XenAPI`` SDK over XML-RPC. ``call`` retries the errors XAPI gives
while another operation holds an object (``VDI_IN_USE``, ``OTHER_OPERATION_IN_PROGRESS``): a
storage rescan or the tail of a previous backup's detach clears them within seconds.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
import xmlrpc.client
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

import XenAPI

from vmkeep.hypervisors.base import HypervisorError

log = logging.getLogger(__name__)

SCHEME = "xapi"
DEFAULT_PORT = 443
PASSWORD_ENV = "VMKEEP_HOST_PASSWORD"
CA_FILE_ENV = "VMKEEP_XAPI_CA_FILE"
ORIGINATOR = "vmkeep"
API_VERSION = "2.21"  # what login_with_password's version argument names (XenServer 8 / XCP-ng 8.3)
TRANSIENT = ("VDI_IN_USE", "OTHER_OPERATION_IN_PROGRESS")
RETRIES = 8  # attempts of a call that keeps failing with a TRANSIENT error
BACKOFF = 0.25  # first wait between them (s), doubled each time, at most MAX_BACKOFF
MAX_BACKOFF = 4.0
LOG_LIMIT = 600  # characters of a reply written to the debug log
SESSION_MASK = "OpaqueRef:<session>"


class XapiError(HypervisorError):
    """XAPI refused a call: ``code`` and ``details`` are its ErrorDescription."""

    def __init__(self, message: str, details: list[str]) -> None:
        super().__init__(message)
        self.details = [str(d) for d in details]
        self.code = self.details[0] if self.details else "UNKNOWN"


def parse_uri(uri: str) -> tuple[str, str, int]:
    """``xapi://USER@HOST[:PORT]`` → (user, host, port)."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise HypervisorError(f"{uri!r} is not a XenServer/XCP-ng address ({exc}): write "
                              "xapi://USER@HOST[:PORT], e.g. xapi://root@xen1.example.com") from exc
    if parts.scheme != SCHEME or not parts.hostname or not parts.username:
        raise HypervisorError(f"{uri!r} is not a XenServer/XCP-ng address: write xapi://USER@HOST[:PORT], e.g. "
                              "xapi://root@xen1.example.com")
    return unquote(parts.username), parts.hostname, port or DEFAULT_PORT


def url_host(host: str) -> str:
    """A host as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


class XapiSession:
    """One logged-in XAPI session at the pool master; ``close`` logs out."""

    def __init__(self, uri: str, password: str | None, *, insecure: bool = False,
                 ca_file: str | None = None) -> None:
        """``password``: else VMKEEP_HOST_PASSWORD. ``ca_file``: the CA that signed the pool's
        certificate (else VMKEEP_XAPI_CA_FILE, else the system's CAs); ``insecure`` skips the check."""
        from vmkeep.settings import secret, settings

        self.uri = uri
        self.user, self.host, self.port = parse_uri(uri)
        env = settings()
        configured = getattr(env, "xapi_ca_file", None) or os.environ.get(CA_FILE_ENV)
        self.ca_file = ca_file or (str(configured) if configured else None)
        self.insecure = insecure
        password = password if password is not None else secret(env.host_password)
        if password is None:
            raise HypervisorError(f"no password for {self.user}@{self.host}: set {PASSWORD_ENV} (or register the "
                                  "hypervisor with its password on the server)")
        self._password = password
        self._lock = threading.RLock()  # one XML-RPC connection: the engine may release from another thread
        self._api: Any = None
        self.ref = ""
        self._old_refs: list[str] = []  # refs the SDK replaced by logging in again (masked as well)
        self._login()

    # -- login -----------------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        """Certificate checks on (the CA file, or the system's CAs) unless asked off."""
        if self.insecure:
            return ssl._create_unverified_context()  # noqa: S323 - asked for with --insecure
        return ssl.create_default_context(cafile=self.ca_file)

    @property
    def base_url(self) -> str:
        return f"https://{url_host(self.host)}:{self.port}/"

    def _login(self) -> None:
        """Log in at ``self.host``; a pool member answers HOST_IS_SLAVE with its master's address,
        where the login is tried again (same port)."""
        for _hop in range(3):
            api = XenAPI.Session(self.base_url, transport=xmlrpc.client.SafeTransport(context=self.ssl_context()))
            log.debug("XAPI login as %s at %s (certificate check %s)", self.user, self.base_url,
                      "off" if self.insecure else "on")
            try:
                api.xenapi.login_with_password(self.user, self._password, API_VERSION, ORIGINATOR)
            except XenAPI.Failure as exc:
                details = [str(d) for d in exc.details]
                log.debug("XAPI login at %s: %s", self.host, details)
                if details[:1] == ["HOST_IS_SLAVE"] and len(details) > 1:
                    log.info("%s is a pool member; logging in at the pool master %s", self.host, details[1])
                    self.host = details[1]
                    continue
                if details[:1] == ["SESSION_AUTHENTICATION_FAILED"]:
                    raise XapiError(f"{self.host} refused the login of {self.user}: check the user and "
                                    f"{PASSWORD_ENV}", details) from exc
                raise XapiError(f"login at {self.host} failed: {' '.join(details)}", details) from exc
            except ssl.SSLCertVerificationError as exc:
                raise HypervisorError(f"the certificate of {self.host} does not check out ({exc.verify_message}): "
                                      f"give its CA in {CA_FILE_ENV}, or skip the check with --insecure") from exc
            except (OSError, xmlrpc.client.ProtocolError, xmlrpc.client.Fault) as exc:
                raise HypervisorError(f"cannot connect to XAPI at {self.base_url}: {exc}") from exc
            self._api = api
            self.ref = str(api._session)  # noqa: SLF001 - the SDK keeps the session ref there
            log.debug("logged in to %s:%d", self.host, self.port)
            return
        raise HypervisorError(f"{self.uri}: the pool members kept redirecting the login (HOST_IS_SLAVE); log in at "
                              "the pool master's address")

    def close(self) -> None:
        with self._lock:
            if self._api is None:
                return
            try:
                self._api.xenapi.session.logout()
                log.debug("logged out of %s", self.host)
            except Exception as exc:  # noqa: BLE001 - logging out of a dead session is not worth an error
                log.warning("logging out of %s failed (%s); XAPI ends the session when it times out", self.host, exc)
            finally:
                self._api = None

    # -- calls -----------------------------------------------------------------------------------
    def call(self, method: str, *args: Any) -> Any:
        """``method`` ("VDI.create") with ``args`` after the session ref; its value, or XapiError.
        VDI_IN_USE and OTHER_OPERATION_IN_PROGRESS are tried again a few times with backoff."""
        delay = BACKOFF
        for attempt in range(1, RETRIES + 1):
            log.debug("XAPI %s%s", method, self._short(args))
            try:
                with self._lock:
                    if self._api is None:
                        raise HypervisorError(f"the XAPI session with {self.host} is closed")
                    target: Any = self._api.xenapi
                    for part in method.split("."):
                        target = getattr(target, part)
                    value = target(*args)
            except XenAPI.Failure as exc:
                details = [self.mask(str(d)) for d in exc.details]  # SESSION_INVALID names the session ref
                log.debug("XAPI %s: failure %s", method, details)
                if details[:1] and details[0] in TRANSIENT and attempt < RETRIES:
                    log.info("XAPI %s: %s; trying again in %.2f s", method, " ".join(details), delay)
                    time.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF)
                    continue
                raise XapiError(f"XAPI {method} failed on {self.host}: {' '.join(details)}", details) from exc
            except (OSError, xmlrpc.client.ProtocolError, xmlrpc.client.Fault) as exc:
                log.debug("XAPI %s: %s", method, exc)
                raise HypervisorError(f"XAPI {method} on {self.host} failed: {exc}") from exc
            self._follow_relogin()
            log.debug("XAPI %s -> %s", method, self._short(value))
            return value
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _short(self, value: Any) -> str:
        """``value`` for the debug log: cut short, and without the session ref (it is a credential
        while the session lasts, and NBD export names carry it)."""
        text = self.mask(repr(value))
        return text if len(text) <= LOG_LIMIT else f"{text[:LOG_LIMIT]}… ({len(text)} characters)"

    def _follow_relogin(self) -> None:
        """The SDK logs in again by itself when XAPI answers SESSION_INVALID (an expired session):
        the new ref is the one NBD export names carry from then on."""
        current = str(getattr(self._api, "_session", None) or "")
        if current and current != self.ref:
            log.debug("XAPI session at %s renewed by the SDK", self.host)
            self._old_refs.append(self.ref)
            self.ref = current

    def mask(self, text: str) -> str:
        """``text`` without this session's refs, plain or URL-encoded (an NBD export name in a URI):
        error messages end up in job records, and a ref is a credential while the session lasts."""
        for ref in (self.ref, *self._old_refs):
            if ref:
                text = text.replace(ref, SESSION_MASK).replace(quote(ref, safe=""), quote(SESSION_MASK, safe=""))
        return text

    def http_url(self, path: str, **query: str) -> str:
        """``https://host:port/path?session_id=REF&…`` (HTTP handlers such as export_raw_vdi)."""
        params = urlencode({"session_id": self.ref, **query})
        return f"https://{url_host(self.host)}:{self.port}/{path.lstrip('/')}?{params}"


