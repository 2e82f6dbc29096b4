"""The typed declaration of every ``VMKEEP_*`` variable (pydantic-settings): load it through
:func:`vmkeep.settings.settings`, which imports this module only when a variable is read."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from vmkeep.settings import PREFIX, env_name


class Settings(BaseSettings):
    """The ``VMKEEP_*`` variables of this process's environment (exact, upper-case names)."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, case_sensitive=True, alias_generator=env_name,
                                      populate_by_name=True, env_ignore_empty=True, extra="ignore", frozen=True)

    # repositories
    passphrase: SecretStr | None = Field(default=None, description=(
        "Passphrase of an encrypted repository, when no --passphrase-file is given (also how nbdkit's point "
        "plugin gets it)"))
    target_passphrase: SecretStr | None = Field(default=None, description=(
        "Passphrase of the target repository of `vmkeep copy`, when no --target-passphrase-file is given (else "
        "the source's passphrase)"))
    s3_endpoint: str | None = Field(default=None, description=(
        "S3 endpoint URL of s3:// repositories, when no --s3-endpoint is given (else AWS_ENDPOINT_URL)"))
    # hypervisors
    host_password: SecretStr | None = Field(default=None, description=(
        "Password of the vCenter/ESXi user of --host vsphere://USER@HOST, or the XenServer/XCP-ng user of "
        "--host xapi://USER@HOST"))
    vsphere_ca_file: Path | None = Field(default=None, description=(
        "PEM file of the CA that signed vCenter's/ESXi's certificate (default: the system's CAs)"))
    xapi_ca_file: Path | None = Field(default=None, description=(
        "PEM file of the CA that signed the XenServer/XCP-ng pool master's certificate (default: the system's CAs)"))
    scratch_dir: Path | None = Field(default=None, description=(
        "Directory on the KVM host for job scratch files and san overlays "
        "(default: /var/lib/libvirt/images/vmkeep-scratch)"))
    nbd_tls_dir: Path | None = Field(default=None, description=(
        "Directory of this proxy's NBD client certificates: ca-cert.pem, client-cert.pem, client-key.pem "
        "(default: /etc/pki/vmkeep)"))
    vddk_dir: Path | None = Field(default=None, description=(
        "Where VMware's VDDK is unpacked, holding lib64/libvixDiskLib.so "
        "(default: /usr/lib/vmware-vix-disklib, then /opt/vmware-vix-disklib-distrib)"))
    nbdkit_plugin_dir: Path | None = Field(default=None, description=(
        "nbdkit's plugin directory, for an nbdkit built with the vddk plugin "
        "(default: /usr/lib/x86_64-linux-gnu/nbdkit/plugins)"))
    # the client of a server
    server: str | None = Field(default=None, description=(
        "URL of the vmkeep server the client commands talk to, when no --server is given"))
    ca_file: Path | None = Field(default=None, description=(
        "PEM file of the CA that signed the server's certificate, for the client commands and `vmkeep proxy`, "
        "when no --ca-file is given (default: the system's CAs)"))
    token: SecretStr | None = Field(default=None, description=(
        "API token: the proxy account's for `vmkeep proxy` (else --token-file); for the client commands, "
        "instead of the one `vmkeep login` stored"))
    password: SecretStr | None = Field(default=None, description="Password for `vmkeep login` (else asked)")
    hypervisor_password: SecretStr | None = Field(default=None, description=(
        "Password of the hypervisor `vmkeep hypervisor add` registers (sealed by the server)"))
    # the server
    database_url: SecretStr | None = Field(default=None, description=(
        "The catalog's PostgreSQL URL, postgresql+psycopg://USER:PASS@HOST/DB, when no --database-url is given "
        "(default: the one in /etc/vmkeep/database.url that scripts/setup writes)"))
    proxy_database_url: str | None = Field(default=None, description=(
        "The catalog's URL as proxies on other machines reach it, when no --proxy-database-url is given "
        "(default: the server's own)"))
    master_key_file: Path | None = Field(default=None, description=(
        "The server's master key, which seals the credentials kept in the catalog; made on first use "
        "(default: /etc/vmkeep/master.key)"))
    new_password: SecretStr | None = Field(default=None, description=(
        "Password of the account `vmkeep user add` creates (else asked)"))
    smtp_user: str | None = Field(default=None, description="SMTP login of the server's e-mail notices (--smtp-host)")
    smtp_password: SecretStr | None = Field(default=None, description="SMTP password of the server's e-mail notices")


def env_names() -> list[str]:
    """The variable name of each field, in the order of the fields."""
    return [env_name(name) for name in Settings.model_fields]
