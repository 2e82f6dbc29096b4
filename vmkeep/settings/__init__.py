"""Every ``VMKEEP_*`` environment variable vmkeep reads, read here and nowhere else.

:class:`vmkeep.settings.model.Settings` (pydantic-settings) declares each one: a typed field with
its description. The README's table "Environment variables" lists the same names, and
tests/test_settings.py keeps the table, the fields and the names read in vmkeep/ in step. A
variable that is unset or empty counts as not given, as it always has; the defaults the
descriptions name are applied where the value is used, beside the constants they come from.

pydantic costs about 100 ms to import, which ``vmkeep --help`` and the light commands must not
pay. So this package's front imports nothing but the standard library, the modules that read a
variable import it inside the function that reads it, and the model loads on the first call of
:func:`settings`, which keeps the object it reads; a caller whose variable may change while the
process runs (a test's ``monkeypatch.setenv``) asks for ``settings(refresh=True)``. The two
variables every repository command reads on its way up, before anything else needs pydantic
(the passphrase, for the key derivation the launcher starts first, and the S3 endpoint), are
plain strings: :func:`quick` reads them as their fields would, without loading the model.

Variables vmkeep *sets* for a program it starts (:data:`FOR_CHILDREN`) are not read here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pydantic import SecretStr

    from vmkeep.settings.model import Settings

PREFIX = "VMKEEP_"
# set by vmkeep for the --script of `vmkeep verify-boot` (the sandbox VM's name and libvirt URI)
FOR_CHILDREN = ("VMKEEP_VERIFY_VM", "VMKEEP_VERIFY_URI")
QuickField = Literal["passphrase", "target_passphrase", "s3_endpoint"]
QUICK_FIELDS: tuple[QuickField, ...] = ("passphrase", "target_passphrase", "s3_endpoint")


def env_name(field: str) -> str:
    """The variable a field is read from: ``passphrase`` → ``VMKEEP_PASSPHRASE``."""
    return PREFIX + field.upper()


def quick(field: QuickField) -> str | None:
    """The value of a text field of :class:`~vmkeep.settings.model.Settings`, read now, without
    loading pydantic: what ``settings(refresh=True)`` would give (a secret's text), or None."""
    return os.environ.get(env_name(field)) or None


_cached: Settings | None = None


def settings(refresh: bool = False) -> Settings:
    """The settings read from the environment at the first call, or read again with ``refresh``
    (which also becomes the object later calls get)."""
    global _cached
    if _cached is None or refresh:
        from vmkeep.settings.model import Settings

        _cached = Settings()
    return _cached


def secret(value: SecretStr | None) -> str | None:
    """The text of a secret field, or None when it is not set."""
    return None if value is None else value.get_secret_value()
