"""A vSphere API session: where to connect, the login, certificate checks, and the property
collector and task helpers the connector uses.

Properties are read through the PropertyCollector, never as attributes of managed objects: an
unset property read as an attribute costs a round trip each time, and some servers drop the
connection on it; task outcomes are read the same way (``info.state``/``info.error``).
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from vmkeep.hypervisors.base import HypervisorError

log = logging.getLogger(__name__)

SCHEME = "vsphere"
DEFAULT_PORT = 443
PASSWORD_ENV = "VMKEEP_HOST_PASSWORD"
CA_FILE_ENV = "VMKEEP_VSPHERE_CA_FILE"
TASK_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Target:
    """``vsphere://USER@HOST[:PORT][?insecure=1&http=1]``: ``insecure`` skips certificate checks,
    ``http`` talks plain HTTP (a lab simulator only)."""

    user: str
    host: str
    port: int
    insecure: bool = False
    http: bool = False

    @classmethod
    def parse(cls, uri: str) -> Target:
        parsed = urlparse(uri)
        if parsed.scheme != SCHEME or not parsed.hostname or not parsed.username:
            raise HypervisorError(f"{uri!r} is not a vSphere address: write vsphere://USER@HOST[:PORT], e.g. "
                                  "vsphere://administrator@vsphere.local@vcenter.example.com")
        query = parse_qs(parsed.query)
        flag = lambda k: query.get(k, ["0"])[-1] in ("1", "true", "yes")  # noqa: E731
        user = unquote(parsed.username)
        if parsed.netloc.count("@") > 1:  # an SSO name like administrator@vsphere.local
            user = unquote(parsed.netloc.rsplit("@", 1)[0])
        return cls(user, parsed.hostname, parsed.port or DEFAULT_PORT, flag("insecure"), flag("http"))

    @property
    def base_url(self) -> str:
        return f"{'http' if self.http else 'https'}://{self.host}:{self.port}"


def ssl_context(target: Target, insecure: bool = False, ca_file: str | None = None) -> ssl.SSLContext | None:
    """Certificate checks on (system CAs, or ``ca_file``) unless asked off."""
    if target.http:
        return None
    if insecure or target.insecure:
        context = ssl._create_unverified_context()  # noqa: S323 - asked for with --insecure / ?insecure=1
        return context
    return ssl.create_default_context(cafile=ca_file)


class Session:
    """One logged-in session; ``close`` logs out."""

    def __init__(self, target: Target, password: str | None = None, insecure: bool = False,
                 ca_file: str | None = None) -> None:
        """``ca_file``: the CA that signed the server's certificate (else VMKEEP_VSPHERE_CA_FILE, else
        the system's)."""
        from vmkeep.settings import secret, settings

        self.target = target
        env = settings()
        self.ca_file = ca_file or (str(env.vsphere_ca_file) if env.vsphere_ca_file else None)
        password = password if password is not None else secret(env.host_password)
        if password is None:
            raise HypervisorError(f"no password for {target.user}@{target.host}: set {PASSWORD_ENV} (or register "
                                  "the hypervisor with its password on the server)")
        self.context = ssl_context(target, insecure, self.ca_file)
        self.password = password  # VDDK logs in on its own
        log.debug("vSphere login as %s at %s (certificate check %s)", target.user, target.base_url,
                  "off" if self.context is None or self.context.verify_mode == ssl.CERT_NONE else "on")
        try:
            self.si = SmartConnect(protocol="http" if target.http else "https", host=target.host, port=target.port,
                                   user=target.user, pwd=password, sslContext=self.context,
                                   disableSslCertValidation=self.context is None and not target.http)
        except vim.fault.InvalidLogin as exc:
            raise HypervisorError(f"{target.host} refused the login of {target.user}: check the user and "
                                  f"{PASSWORD_ENV}") from exc
        except ssl.SSLCertVerificationError as exc:
            raise HypervisorError(f"the certificate of {target.host} does not check out ({exc.verify_message}): "
                                  f"give its CA in {CA_FILE_ENV}, or skip the check with --insecure (?insecure=1 in "
                                  "a registered address)") from exc
        except (OSError, vmodl.MethodFault) as exc:
            raise HypervisorError(f"cannot connect to vSphere at {target.base_url}: {exc}") from exc
        self.content = self.si.RetrieveContent()
        about = self.content.about
        log.debug("logged in to %s: %s (API %s)", target.host, getattr(about, "fullName", "?"),
                  getattr(about, "apiVersion", "?"))

    def close(self) -> None:
        try:
            Disconnect(self.si)
            log.debug("logged out of %s", self.target.host)
        except Exception as exc:  # noqa: BLE001 - logging out of a dead session is not worth an error
            log.warning("logging out of %s failed (%s); the server ends the session when it times out",
                        self.target.host, exc)

    @property
    def verifies(self) -> bool:
        """Whether this session checks the server's certificate (HTTPS without --insecure)."""
        return self.context is not None and self.context.verify_mode != ssl.CERT_NONE

    def thumbprint(self) -> str:
        """The SHA-1 fingerprint of the server's certificate, as VDDK wants it (AA:BB:…)."""
        pem = ssl.get_server_certificate((self.target.host, self.target.port))
        digest = hashlib.sha1(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()  # noqa: S324 - VDDK's format
        thumbprint = ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
        log.debug("certificate thumbprint of %s:%d: %s", self.target.host, self.target.port, thumbprint)
        return thumbprint

    @property
    def cookie(self) -> str:
        """The session cookie (``vmware_soap_session=…``) for HTTP requests in this session."""
        raw: str = self.si._stub.cookie  # noqa: SLF001 - pyvmomi keeps it there
        return raw.split(";", 1)[0].strip()

    def about(self) -> Any:
        return self.content.about

    def collect(self, kind: type, paths: list[str],
                objects: list[Any] | None = None) -> list[tuple[Any, dict[str, Any]]]:
        """(object, {path: value}) for every object of ``kind`` (or just ``objects``); unset
        properties are absent from the dict."""
        pc = self.content.propertyCollector
        if objects is None:
            view = self.content.viewManager.CreateContainerView(self.content.rootFolder, [kind], True)
            try:
                spec = vmodl.query.PropertyCollector.FilterSpec(
                    objectSet=[vmodl.query.PropertyCollector.ObjectSpec(
                        obj=view, skip=True, selectSet=[vmodl.query.PropertyCollector.TraversalSpec(
                            name="view", path="view", skip=False, type=vim.view.ContainerView)])],
                    propSet=[vmodl.query.PropertyCollector.PropertySpec(type=kind, pathSet=paths)])
                return self._retrieve(pc, spec)
            finally:
                view.Destroy()
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=o, skip=False) for o in objects],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=kind, pathSet=paths)])
        return self._retrieve(pc, spec)

    @staticmethod
    def _retrieve(pc: Any, spec: Any) -> list[tuple[Any, dict[str, Any]]]:
        out = []
        result = pc.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
        while result is not None:
            for oc in result.objects:
                out.append((oc.obj, {p.name: p.val for p in (oc.propSet or [])}))
            result = pc.ContinueRetrievePropertiesEx(result.token) if result.token else None
        return out

    def one(self, obj: Any, paths: list[str]) -> dict[str, Any]:
        found = self.collect(type(obj), paths, [obj])
        return found[0][1] if found else {}

    def wait(self, task: Any, what: str, timeout: float = TASK_TIMEOUT) -> Any:
        """The task's result once it succeeds; its fault as a HypervisorError otherwise."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        log.debug("%s on %s: task %s", what, self.target.host, getattr(task, "_moId", task))
        while True:
            info = self.one(task, ["info.state", "info.error", "info.result"])
            state = info.get("info.state")
            if state == vim.TaskInfo.State.success:
                log.debug("%s on %s: done", what, self.target.host)
                return info.get("info.result")
            if state == vim.TaskInfo.State.error:
                fault = info.get("info.error")
                message = getattr(fault, "localizedMessage", None) or getattr(getattr(fault, "fault", None), "msg",
                                                                              None) or str(fault)
                log.debug("%s on %s: %s (%s)", what, self.target.host, message,
                          type(getattr(fault, "fault", None) or fault).__name__)
                raise HypervisorError(f"{what} failed on {self.target.host}: {message}")
            if time.monotonic() > deadline:
                raise HypervisorError(f"{what} did not finish within {timeout:.0f} s on {self.target.host}")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
