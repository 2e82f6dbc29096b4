"""Where vmkeep's log lines go: one line per event on stderr, as text or one JSON object per line,
with whatever looks like a secret masked on the way out.

Modules log through ``logging.getLogger(__name__)`` (all under ``vmkeep``); this sets the level and
the format once per process (``-v``, ``--debug``, ``--log-format json``). Context a line belongs
to (the job, the VM, the proxy) comes as ``extra={"job": …, "vm": …, "proxy": …}`` and becomes
JSON fields or a ``[job=… vm=…]`` prefix.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
CONTEXT_FIELDS = ("job", "restore", "vm", "proxy", "policy", "disk")
MASK = "***"

# What must never reach a log line, whatever a message quotes: API tokens, the password of a URL
# (database, hypervisor, S3), password/secret/token/session parameters and headers (plain and URL-encoded),
# XAPI session refs in its errors, private keys.
_KEYWORD = r"[\w\-]*(?:password|passwd|passphrase|secret|token|api[_\-]?key|session|cookie)[\w\-]*"
SECRETS = (
    (re.compile(r"\bvk_[A-Za-z0-9_\-]{8,}"), "vk_" + MASK),
    # a URL's user info: everything after the user's ':' up to the last '@' before the host
    (re.compile(r"(?P<keep>\b[a-z][a-z0-9+.\-]*://[^/\s:@]+:)[^\s]*@(?=[^@\s]*(?:[/?#\s]|$))", re.I),
     r"\g<keep>" + MASK + "@"),
    # "password": "two words", password='x', VMKEEP_HOST_PASSWORD=x, db_password: x, smtp_password=…
    (re.compile(r"(?P<keep>" + _KEYWORD + r"[\"']?\s*[=:]\s*)(?P<q>[\"'])(?:(?!(?P=q)).)*(?P=q)", re.I),
     r"\g<keep>\g<q>" + MASK + r"\g<q>"),
    (re.compile(r"(?P<keep>" + _KEYWORD + r"[\"']?\s*[=:]\s*)[^\s'\",;&]+", re.I), r"\g<keep>" + MASK),
    (re.compile(r"(?P<keep>\b(?:authorization|proxy-authorization)[\"']?\s*[:=]\s*[\"']?[\w\-]+\s+)[^\s'\",;]+",
                re.I), r"\g<keep>" + MASK),
    # the same URL-encoded into a URI (an NBD export name inside nbds://…: session_id%3DOpaqueRef%3A…)
    (re.compile(r"(?P<keep>" + _KEYWORD + r"%3D)(?:[\w\-.~]|%3A)+", re.I), r"\g<keep>" + MASK),
    # XAPI's SESSION_INVALID names the (expired, maybe still valid elsewhere) session ref it refused
    (re.compile(r"(?P<keep>SESSION_INVALID[\s\[\]'\",]*)OpaqueRef:[\w\-]+"), r"\g<keep>OpaqueRef:" + MASK),
    # a private key, or what is left of one when a message was cut short
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S),
     "[private key " + MASK + "]"),
)


def redact(text: str) -> str:
    """``text`` with every secret :data:`SECRETS` recognises masked."""
    for pattern, replacement in SECRETS:
        text = pattern.sub(replacement, text)
    return text


class Redacting(logging.Filter):
    """Masks secrets in the finished message (arguments included) and in exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in CONTEXT_FIELDS if getattr(record, k, None) is not None}


class TextFormatter(logging.Formatter):
    """``2026-12-04T22:16:29Z INFO vmkeep.proxy [job=3 vm=web1] message``."""

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        context = " ".join(f"{k}={v}" for k, v in _context(record).items())
        # one event, one line: a message quoting a newline (a path, a guest's file name) cannot forge another
        message = record.getMessage().replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        line = f"{at} {record.levelname} {record.name} " + (f"[{context}] " if context else "") + message
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the context fields, the error."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
            **_context(record),
        }
        if record.exc_text:
            entry["error"] = record.exc_text
        return json.dumps(entry, default=str)


_format: LogFormat = "text"


def json_lines() -> bool:
    """Whether stderr carries JSON log lines (then nothing else may draw there: progress bars)."""
    return _format == "json"


def configure(level: int, fmt: LogFormat = "text", stream: TextIO | None = None) -> None:
    """Send the ``vmkeep`` loggers' lines at ``level`` and above to ``stream`` (stderr), once;
    a second call changes level and format."""
    global _format
    _format = fmt
    logger = logging.getLogger("vmkeep")
    for old in [h for h in logger.handlers if getattr(h, "vmkeep", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.vmkeep = True  # type: ignore[attr-defined]
    handler.addFilter(Redacting())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def level_of(verbose: bool, debug: bool, daemon: bool = False) -> int:
    """``--debug``: everything asked of outside systems; ``-v`` (and the long-running server and
    proxy): one line per event; else warnings and errors."""
    if debug:
        return logging.DEBUG
    return logging.INFO if verbose or daemon else logging.WARNING


def take_options(argv: list[str]) -> tuple[list[str], int, LogFormat]:
    """``-v``/``--verbose``, ``--debug`` and ``--log-format text|json`` wherever they are on the
    command line (before or after the command); the rest of it, the level and the format."""
    rest: list[str] = []
    verbose = debug = False
    fmt: str = "text"
    args = iter(argv)
    for arg in args:
        if arg == "--":
            rest += [arg, *args]
            break
        if arg in ("-v", "--verbose"):
            verbose = True
        elif arg == "--debug":
            debug = True
        elif arg == "--log-format":
            fmt = next(args, "text")
        elif arg.startswith("--log-format="):
            fmt = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if fmt not in ("text", "json"):
        raise ValueError(f"--log-format {fmt!r}: use text or json")
    command = next((a for a in rest if not a.startswith("-")), None)
    return rest, level_of(verbose, debug, daemon=command in DAEMONS), fmt  # type: ignore[return-value]


DAEMONS = ("server", "proxy")  # long-running: one line per event by default
