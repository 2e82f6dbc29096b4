"""The notice that a policy run ended: a webhook (JSON POST) and/or an e-mail over SMTP."""

from __future__ import annotations

import logging
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx

from vmkeep.catalog.models import Job
from vmkeep.server.endpoints import EndpointPolicy, EndpointRefused

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10


@dataclass
class Mailer:
    """The SMTP server the master sends through (``vmkeep server --smtp-host …``)."""

    host: str
    port: int = 25
    sender: str = "vmkeep@localhost"
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None  # CA of the SMTP server's certificate; default: the system's

    def send(self, to: list[str], subject: str, body: str) -> None:
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = self.sender, ", ".join(to), subject
        message.set_content(body)
        log.debug("SMTP %s:%d: sending %r to %d recipients (STARTTLS %s, login %s)", self.host, self.port, subject,
                  len(to), "on" if self.starttls else "off", self.username if self.username and self.password
                  else "none")
        with smtplib.SMTP(self.host, self.port, timeout=TIMEOUT_SECONDS) as smtp:
            if self.starttls:  # verified: an unchecked certificate would hand the login to anyone between
                smtp.starttls(context=ssl.create_default_context(cafile=self.ca_file))
            if self.username and self.password:
                smtp.login(self.username, self.password)
            refused = smtp.send_message(message)
        if refused:
            log.warning("SMTP %s:%d refused some recipients: %s", self.host, self.port,
                        ", ".join(f"{r} ({code})" for r, (code, _m) in refused.items()))
        else:
            log.debug("SMTP %s:%d accepted the message", self.host, self.port)


def job_summary(job: Job) -> dict[str, Any]:
    return {
        "job": job.id, "policy": job.policy_name, "status": job.status, "requested_by": job.requested_by,
        "started": job.started.isoformat(), "finished": job.finished.isoformat() if job.finished else None,
        "vms": [{"vm": v.vm_name, "status": v.status, "mode": v.mode, "transport": v.transport,
                 "read_bytes": v.read_bytes, "stored_bytes": v.stored_bytes, "point": v.point_id,
                 "proxy": v.proxy, "attempts": v.attempts, "warnings": v.warnings, "error": v.error}
                for v in job.vms],
    }


def _text(summary: dict[str, Any]) -> str:
    lines = [f"Policy {summary['policy']}: run {summary['job']} {summary['status']}", ""]
    for v in summary["vms"]:
        line = f"- {v['vm']}: {v['status']}"
        if v["point"]:
            line += f", point {v['point']} ({v['mode']}, {v['transport']}, {v['read_bytes'] or 0} bytes read)"
        if v["error"]:
            line += f" — {v['error']}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def post_json(url: str, payload: Any, endpoints: EndpointPolicy,
              timeout: float = TIMEOUT_SECONDS) -> httpx.Response:
    """POST ``payload`` to ``url`` at the address checked just now (not one resolved again later,
    which DNS could point elsewhere); the name still goes in Host and, for HTTPS, in SNI and the
    certificate check. Redirects are not followed: they could lead anywhere."""
    parsed, address = endpoints.check(url, "webhook")
    extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
    # only scheme and host: a webhook's path or query often is its secret (Slack, Teams, …)
    log.debug("webhook POST to %s://%s (address %s)", parsed.scheme, parsed.host, address)
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        reply = client.post(parsed.copy_with(host=address), json=payload, extensions=extensions,
                            headers={"Host": parsed.netloc.decode("ascii")})
    log.debug("webhook %s://%s answered %d", parsed.scheme, parsed.host, reply.status_code)
    return reply


def notify_job(job: Job, mailer: Mailer | None, endpoints: EndpointPolicy = EndpointPolicy()) -> str | None:
    """Send what the policy asks for; the errors met (None when everything went out)."""
    summary = job_summary(job)
    errors = []
    policy = job.policy
    if policy is None:
        return None  # deleted since: nobody to tell
    if policy.notify_webhook:
        try:
            reply = post_json(policy.notify_webhook, summary, endpoints)
            if reply.status_code >= 300:
                errors.append(f"webhook answered {reply.status_code}")
        except EndpointRefused as exc:
            errors.append(f"webhook refused: {exc}")
        except httpx.HTTPError as exc:
            errors.append(f"webhook failed: {exc}")
    if policy.notify_email:
        if mailer is None:
            errors.append("e-mail asked for, but the server has no --smtp-host")
        else:
            try:
                mailer.send(list(policy.notify_email), f"vmkeep: {policy.name} {job.status}", _text(summary))
            except (OSError, smtplib.SMTPException) as exc:
                errors.append(f"e-mail failed: {exc}")
    context = {"job": job.id, "policy": policy.name}
    if errors:
        log.warning("notice of run %s not fully sent: %s", job.id, "; ".join(errors), extra=context)
    else:
        sent = [w for w, on in (("webhook", policy.notify_webhook), ("e-mail", policy.notify_email)) if on]
        if sent:
            log.info("notice of run %s sent by %s", job.id, " and ".join(sent), extra=context)
    return "; ".join(errors) or None
