"""The policy form of the console: its fields as the API's ``PolicyIn`` and back, the errors of
either (pydantic's, the API's refusals) by the field that caused them, and the list page's rows.

The form posts plain text: lists one item a line, numbers as typed. They go through ``PolicyIn``
unchanged in meaning, so what the console accepts and refuses is exactly what the API does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vmkeep.catalog.models import AFTER_BACKUP, Hypervisor, Job, Policy, RepositoryRecord
from vmkeep.catalog.models import VirtualMachine as VM
from vmkeep.errors import VmkeepError
from vmkeep.server.console.paging import Paging
from vmkeep.server.dispatch import selection_clause
from vmkeep.server.routes_jobs import PolicyIn, PolicyRefused
from vmkeep.server.schedule import next_run

LISTS = ("vms", "globs", "hosts", "tags", "folders", "notify_email")
RULES = ("vms", "globs", "hypervisor", "hosts", "tags", "folders")  # the selection rules
NUMBERS = ("full_every", "max_per_host", "max_per_datastore", "max_per_proxy")
KEEP = ("last", "hourly", "daily", "weekly", "monthly", "yearly")  # retention counts, fields keep_<kind>
FLAGS = ("verify_after", "verify_boot")
PREVIEW_SHOWN = 50
RUNS_SHOWN = 5
API_PREFIX = "bad transports, retention or schedule: "  # beside the field, the prefix says nothing more

# pydantic's words for a pattern are a regular expression; an administrator gets these instead
PATTERN_WORDS = {
    "name": "Use letters, digits, '.', '_' and '-' (up to 100 characters), starting with a letter or digit.",
    "notify_webhook": "Give an address that starts with http:// or https://.",
    "quiesce": "Choose required, try or off.",
    "nbd_tls": "Choose require, auto or off.",
}


def lines(text: str) -> list[str]:
    """A textarea's items: one a line, blank lines and surrounding spaces dropped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def number(text: str) -> int | str:
    """A number field's value: an int, or the text as typed so that pydantic says what is wrong."""
    try:
        return int(text)
    except ValueError:
        return text


def body_of(fields: dict[str, str]) -> dict[str, Any]:
    """The JSON body the API would get for these form fields."""
    text = {k: v.strip() for k, v in fields.items()}
    body: dict[str, Any] = {"name": text.get("name", ""), "repository": text.get("repository", ""),
                            "hypervisor": text.get("hypervisor") or None, "schedule": text.get("schedule") or None,
                            "transports": text.get("transports", ""), "quiesce": text.get("quiesce", "try"),
                            "nbd_tls": text.get("nbd_tls", "require"),
                            "notify_webhook": text.get("notify_webhook") or None,
                            "retention": {k: number(text[f"keep_{k}"]) for k in KEEP if text.get(f"keep_{k}")}}
    body |= {k: lines(fields.get(k, "")) for k in LISTS}
    body |= {k: number(text[k]) if text.get(k) else None for k in NUMBERS}
    body |= {k: text.get(k) == "on" for k in FLAGS}
    return body


def rules_of(fields: dict[str, str]) -> dict[str, Any]:
    """The selection rules alone, as a policy stores them (for the live preview)."""
    body = body_of(fields)
    return {k: body[k] for k in RULES}


def fields_of(policy: Policy) -> dict[str, str]:
    """A stored policy as the form shows it."""
    rules = policy.selection
    fields = {k: "\n".join(str(v) for v in rules.get(k) or []) for k in ("vms", "globs", "hosts", "tags", "folders")}
    fields |= {"name": policy.name, "repository": policy.repository.name, "hypervisor": rules.get("hypervisor") or "",
               "schedule": policy.schedule or "", "transports": policy.transports, "quiesce": policy.quiesce,
               "nbd_tls": policy.nbd_tls, "notify_webhook": policy.notify_webhook or "",
               "notify_email": "\n".join(policy.notify_email or [])}
    fields |= {f"keep_{k}": str(policy.retention[k]) for k in KEEP if k in policy.retention}
    fields |= {k: "" if getattr(policy, k) is None else str(getattr(policy, k)) for k in NUMBERS}
    fields |= {k: "on" for k in FLAGS if getattr(policy, k)}
    return fields


def new_fields() -> dict[str, str]:
    """A new policy's form: the API's defaults."""
    defaults = PolicyIn(name="x", repository="")
    return {"transports": defaults.transports, "quiesce": defaults.quiesce, "nbd_tls": defaults.nbd_tls}


def parse(fields: dict[str, str]) -> tuple[PolicyIn | None, dict[str, str]]:
    """``PolicyIn`` from the form, or the errors by field (``keep_daily`` for a retention count)."""
    try:
        body = PolicyIn.model_validate(body_of(fields))
    except ValidationError as exc:
        errors: dict[str, str] = {}
        for error in exc.errors():
            loc = error["loc"]
            field = f"keep_{loc[1]}" if loc[0] == "retention" and len(loc) > 1 else str(loc[0])
            words = PATTERN_WORDS.get(field) if error["type"] == "string_pattern_mismatch" else None
            errors.setdefault(field, words or f"{error['msg']}.")
        return None, errors
    if not body.repository:
        return None, {"repository": "Choose the repository the points go to (register one first if there is none)."}
    return body, {}


def refusal(exc: PolicyRefused) -> dict[str, str]:
    """The API's refusal as a form error: beside its field, or above the form."""
    return {exc.field or "form": str(exc.detail).removeprefix(API_PREFIX)}


@dataclass
class Runs:
    times: list[datetime]
    error: str | None = None


def next_runs(schedule: str, now: datetime | None = None) -> Runs:
    """The next few times a cron schedule names, with the schedule module the master runs on."""
    at, times = now or datetime.now(UTC), []
    try:
        for _ in range(RUNS_SHOWN):
            at = next_run(schedule, at)
            times.append(at)
    except VmkeepError as exc:
        return Runs([], str(exc))
    return Runs(times)


@dataclass
class Preview:
    vms: list[tuple[str, str, str]]  # name, hypervisor, host of the first ones
    total: int


def preview(session: Session, rules: dict[str, Any]) -> Preview:
    """The VMs the (unsaved) rules select now: the dispatcher's rules as one SQL condition
    (dispatch.selection_clause, which picks what dispatch.select_vms picks), counted and sliced in
    the catalog: a keystroke does not read 10,000 VMs."""
    query = (select(VM.name, Hypervisor.name, VM.host).join(Hypervisor)
             .where(VM.present.is_(True), selection_clause(rules)).order_by(VM.name, Hypervisor.name))
    shown = [(vm, hypervisor, host) for vm, hypervisor, host in session.execute(query.limit(PREVIEW_SHOWN))]
    return Preview(shown, len(shown) if len(shown) < PREVIEW_SHOWN else selected_count(session, rules))


def selected_count(session: Session, rules: dict[str, Any]) -> int:
    """How many present VMs the rules select now, counted in SQL."""
    query = (select(func.count()).select_from(VM).join(Hypervisor)
             .where(VM.present.is_(True), selection_clause(rules)))
    return session.scalar(query) or 0


def selection_text(rules: dict[str, Any]) -> str:
    """'globs app-*; tags prod' — a policy's rules in one line; 'every VM' when there are none."""
    parts = [f"{label} {', '.join(str(v) for v in rules[key])}" for key, label in
             (("vms", "VMs"), ("globs", "globs"), ("hosts", "hosts"), ("tags", "tags"), ("folders", "folders"))
             if rules.get(key)]
    if rules.get("hypervisor"):
        parts.append(f"on {rules['hypervisor']}")
    return "; ".join(parts) or "every VM"


def retention_text(retention: dict[str, Any]) -> str:
    return ", ".join(f"{k} {retention[k]}" for k in KEEP if k in retention) or "keep everything"


@dataclass
class PolicyRow:
    policy: Policy
    selection: str
    retention: str
    selected: int
    last_job: Job | None
    copies: list[str]  # its copy targets, each with its schedule and retention


def copies_text(policy: Policy) -> list[str]:
    return [f"{t.repository.name} ({'after each backup' if t.schedule == AFTER_BACKUP else t.schedule}; "
            f"{retention_text(t.retention)})" for t in policy.copy_targets]


def policy_rows(session: Session, paging: Paging) -> list[PolicyRow]:
    """One page of policies, counted and sliced in SQL, with each one's VMs now and newest run."""
    paging.total = session.scalar(select(func.count()).select_from(Policy)) or 0
    policies = list(session.scalars(select(Policy).order_by(Policy.name).offset(paging.offset)
                                    .limit(paging.per_page)))
    newest = select(func.max(Job.id)).where(Job.policy_id.in_([p.id for p in policies])).group_by(Job.policy_id)
    jobs = {j.policy_id: j for j in session.scalars(select(Job).where(Job.id.in_(newest)))}
    return [PolicyRow(p, selection_text(p.selection), retention_text(p.retention), selected_count(session, p.selection),
                      jobs.get(p.id), copies_text(p)) for p in policies]


def choices(session: Session) -> dict[str, list[str]]:
    """What the form's selects offer: registered repositories and hypervisors."""
    return {"repositories": list(session.scalars(select(RepositoryRecord.name).order_by(RepositoryRecord.name))),
            "hypervisors": list(session.scalars(select(Hypervisor.name).order_by(Hypervisor.name)))}
