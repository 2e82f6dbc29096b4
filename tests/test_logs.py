"""What vmkeep logs: one line per event (text or JSON), with context fields, and no secret in any
line whatever a message quotes."""

from __future__ import annotations

import io
import json
import logging

import pytest

from vmkeep.logs import configure, redact, take_options

TOKEN = "vk_Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA"
SECRETS = [
    (f"Authorization: Bearer {TOKEN}", TOKEN),
    ("postgresql+psycopg://vmkeep:db-pass-77@127.0.0.1/vmkeep", "db-pass-77"),
    ("qemu+ssh://root:ssh-pass-1@host/system", "ssh-pass-1"),
    ("login with password=hunter22&user=x", "hunter22"),
    ('{"name": "admin", "password": "admin-password-1"}', "admin-password-1"),
    ("aws_secret_access_key = AbCdEfGh1234", "AbCdEfGh1234"),
    ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkq\n-----END PRIVATE KEY-----", "MIIEvQIBADANBgkq"),
    ("refused: -----BEGIN RSA PRIVATE KEY-----\nMIIEcutshort", "MIIEcutshort"),  # a reply cut at 200 bytes
    ("VMKEEP_HOST_PASSWORD=hunter2 vmkeep backup", "hunter2"),
    ("db_password: s3cr3t-db", "s3cr3t-db"),
    ('{"smtp_password": "two words"}', "words"),
    ("postgresql://u:ab/cd@db/x", "ab/cd"),
    ("postgresql://u:p@ss@db/x", "ss@db"),
    ("Authorization: Token abcdef123456", "abcdef123456"),
    ("Cookie: vmware_soap_session=52a1b2c3d4", "52a1b2c3d4"),
    ("s3_secret_key=AKIAxyz", "AKIAxyz"),
    # a XAPI session ref: in an NBD export name, plain and URL-encoded into an nbds:// URI, and in XAPI's errors
    ("export /6f1c?session_id=OpaqueRef:5e2a0c1d-77aa-4b1e-9c1f-0d3e4f5a6b7c", "5e2a0c1d-77aa"),
    ("reading 65536 bytes at 0 from nbds://127.0.0.1:10809/%2F6f1c%3Fsession_id%3DOpaqueRef%3A5e2a0c1d-77aa-4b1e"
     "?tls-certificates=/tmp/x failed", "5e2a0c1d-77aa"),
    ("XAPI VM.get_record failed on 127.0.0.1: SESSION_INVALID OpaqueRef:5e2a0c1d-77aa-4b1e", "5e2a0c1d-77aa"),
    ("failure ['SESSION_INVALID', 'OpaqueRef:5e2a0c1d-77aa-4b1e']", "5e2a0c1d-77aa"),
]


@pytest.mark.parametrize("text,secret", SECRETS)
def test_secrets_are_masked(text: str, secret: str) -> None:
    assert secret not in redact(text) and "***" in redact(text)


def test_a_session_ref_masked_in_a_uri_keeps_the_rest() -> None:
    uri = "nbds://h:10809/%2F6f1c%3Fsession_id%3DOpaqueRef%3A5e2a-77aa?tls-certificates=/tmp/x"
    assert redact(uri) == "nbds://h:10809/%2F6f1c%3Fsession_id%3D***?tls-certificates=/tmp/x"
    assert redact("/6f1c?session_id=OpaqueRef:5e2a-77aa&x=1") == "/6f1c?session_id=***&x=1"


def test_a_message_cannot_forge_another_line() -> None:
    out = io.StringIO()
    configure(logging.INFO, "text", out)
    logging.getLogger("vmkeep.test_logs").info("GET %s", "/x\n2026-12-04T22:00:00Z INFO vmkeep.server admin in")
    configure(logging.WARNING)
    assert len(out.getvalue().splitlines()) == 1 and "\\n2026" in out.getvalue()


def test_lines_as_text_and_json_with_context_and_no_secret() -> None:
    log = logging.getLogger("vmkeep.test_logs")
    for fmt in ("text", "json"):
        out = io.StringIO()
        configure(logging.INFO, fmt, out)  # type: ignore[arg-type]
        log.debug("not at info")
        log.info("backup of %s with token %s", "web1", TOKEN, extra={"job": 7, "vm": "web1", "proxy": "pa"})
        try:
            raise RuntimeError(f"connect to postgresql://u:pw-in-error@db/x failed ({TOKEN})")
        except RuntimeError:
            log.exception("the master's periodic work failed")
        text = out.getvalue()
        assert TOKEN not in text and "pw-in-error" not in text and "not at info" not in text
        if fmt == "json":
            first, second = (json.loads(line) for line in text.splitlines()[:2])
            assert {k: first[k] for k in ("level", "logger", "job", "vm", "proxy")} == \
                {"level": "info", "logger": "vmkeep.test_logs", "job": 7, "vm": "web1", "proxy": "pa"}
            assert second["level"] == "error" and "RuntimeError" in second["error"]
        else:
            assert "INFO vmkeep.test_logs [job=7 vm=web1 proxy=pa] backup of web1 with token vk_***" in text
    configure(logging.WARNING)


def test_logging_options_go_anywhere_on_the_command_line() -> None:
    assert take_options(["backup", "vm1", "--repo", "r", "-v"]) == (["backup", "vm1", "--repo", "r"], logging.INFO,
                                                                    "text")
    assert take_options(["--debug", "--log-format", "json", "jobs"]) == (["jobs"], logging.DEBUG, "json")
    assert take_options(["proxy", "--name", "p"])[1] == logging.INFO  # the long-running ones log events
    assert take_options(["backup", "--", "-v"])[0] == ["backup", "--", "-v"]
    with pytest.raises(ValueError, match="use text or json"):
        take_options(["--log-format=xml", "jobs"])
