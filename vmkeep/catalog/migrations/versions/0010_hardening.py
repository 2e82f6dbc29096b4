"""security hardening: address allowances, an append-only hash-chained audit log, expiring tokens,
job history that outlives its hypervisor, restore locations per hypervisor, TLS required across
the network by default (and recorded per point), and the views a proxy's database role reads its
work from

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

from vmkeep.catalog.audit_chain import GENESIS, entry_hash

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

TOKEN_DAYS_DEFAULT = 365

APPEND_ONLY = """
CREATE OR REPLACE FUNCTION vmkeep_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION vmkeep_audit_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION vmkeep_audit_append_only();
"""

# What a proxy needs to run the backups and restores still to do, and nothing of anything else:
# the views run with their owner's rights, so the proxy role reads them without any grant on
# hypervisors, policies, repositories or vms. Sealed secrets open only with the master key.
BACKUP_WORK = """
CREATE VIEW proxy_backup_work AS
SELECT jv.id AS job_vm_id, v.name AS vm_name, v.uuid AS vm_uuid,
       h.name AS hypervisor, h.kind AS hypervisor_kind, h.uri AS hypervisor_uri,
       h.username AS hypervisor_username, h.secret_sealed AS hypervisor_secret_sealed,
       h.allow_plain_tcp, h.allow_unsafe_options,
       r.id AS repository_id, r.name AS repository, r.location AS repository_location,
       r.s3_endpoint AS repository_s3_endpoint, r.passphrase_sealed AS repository_passphrase_sealed,
       r.repo_id AS repository_repo_id, r.encrypted AS repository_encrypted,
       p.transports, p.quiesce, p.nbd_tls, p.full_every, p.verify_after, p.verify_boot, p.retention
FROM job_vms jv
JOIN jobs j ON j.id = jv.job_id
JOIN policies p ON p.id = j.policy_id
JOIN vms v ON v.id = jv.vm_id
JOIN hypervisors h ON h.id = v.hypervisor_id
JOIN repositories r ON r.id = p.repository_id
WHERE jv.status IN ('queued', 'running')
"""
RESTORE_WORK = """
CREATE VIEW proxy_restore_work AS
SELECT rj.id AS restore_id,
       h.name AS hypervisor, h.kind AS hypervisor_kind, h.uri AS hypervisor_uri,
       h.username AS hypervisor_username, h.secret_sealed AS hypervisor_secret_sealed,
       h.allow_plain_tcp, h.allow_unsafe_options,
       r.id AS repository_id, r.name AS repository, r.location AS repository_location,
       r.s3_endpoint AS repository_s3_endpoint, r.passphrase_sealed AS repository_passphrase_sealed,
       r.repo_id AS repository_repo_id, r.encrypted AS repository_encrypted
FROM restore_jobs rj
JOIN hypervisors h ON h.id = rj.hypervisor_id
JOIN repositories r ON r.id = rj.repository_id
WHERE rj.status IN ('queued', 'running')
"""


def upgrade() -> None:
    # 1. addresses: what an administrator allowed beyond the safe default
    op.add_column('hypervisors', sa.Column('allow_plain_tcp', sa.Boolean(), nullable=False,
                                           server_default=sa.false()))
    op.add_column('hypervisors', sa.Column('allow_unsafe_options', sa.Boolean(), nullable=False,
                                           server_default=sa.false()))

    # 9. where restores may write on each hypervisor, as an administrator registered it
    op.add_column('hypervisors', sa.Column('restore_locations', sa.JSON(), nullable=False, server_default='[]'))

    # 3. the audit log: hash chain over the entries there are, then append-only
    op.add_column('audit_log', sa.Column('prev_hash', sa.String(64), nullable=True))
    op.add_column('audit_log', sa.Column('hash', sa.String(64), nullable=True))
    conn = op.get_bind()
    rows = conn.execute(sa.text('SELECT id, at, "user", action, target, client, detail FROM audit_log ORDER BY id'))
    previous = GENESIS
    for row in rows.all():
        digest = entry_hash(previous, row.at, row.user, row.action, row.target, row.client, row.detail or {})
        conn.execute(sa.text("UPDATE audit_log SET prev_hash = :p, hash = :h WHERE id = :id"),
                     {"p": previous, "h": digest, "id": row.id})
        previous = digest
    op.execute(APPEND_ONLY)

    # 6. every token expires
    op.execute(f"UPDATE api_tokens SET expires = created + interval '{TOKEN_DAYS_DEFAULT} days' "
               "WHERE expires IS NULL")
    op.alter_column('api_tokens', 'expires', nullable=False)

    # 14. deleting a hypervisor (and with it its VMs) keeps the backup and restore history
    op.alter_column('job_vms', 'vm_id', nullable=True)
    op.drop_constraint('job_vms_vm_id_fkey', 'job_vms', type_='foreignkey')
    op.create_foreign_key('job_vms_vm_id_fkey', 'job_vms', 'vms', ['vm_id'], ['id'], ondelete='SET NULL')
    op.add_column('restore_jobs', sa.Column('hypervisor_name', sa.String(200), nullable=False, server_default=''))
    op.execute("UPDATE restore_jobs SET hypervisor_name = h.name FROM hypervisors h WHERE h.id = hypervisor_id")
    op.alter_column('restore_jobs', 'hypervisor_id', nullable=True)
    op.drop_constraint('restore_jobs_hypervisor_id_fkey', 'restore_jobs', type_='foreignkey')
    op.create_foreign_key('restore_jobs_hypervisor_id_fkey', 'restore_jobs', 'hypervisors', ['hypervisor_id'],
                          ['id'], ondelete='SET NULL')

    # 8. server-dispatched backups require TLS across the network unless the policy says otherwise;
    # each point says how its data travelled
    op.add_column('policies', sa.Column('nbd_tls', sa.String(10), nullable=False, server_default='require'))
    op.add_column('restore_points', sa.Column('wire', sa.String(10), nullable=True))

    # 2. the proxies' work, readable through views only
    op.execute(BACKUP_WORK)
    op.execute(RESTORE_WORK)


def downgrade() -> None:
    op.execute("DROP VIEW proxy_restore_work")
    op.execute("DROP VIEW proxy_backup_work")
    op.drop_column('restore_points', 'wire')
    op.drop_column('policies', 'nbd_tls')
    op.drop_constraint('restore_jobs_hypervisor_id_fkey', 'restore_jobs', type_='foreignkey')
    op.execute("DELETE FROM restore_jobs WHERE hypervisor_id IS NULL")
    op.create_foreign_key('restore_jobs_hypervisor_id_fkey', 'restore_jobs', 'hypervisors', ['hypervisor_id'],
                          ['id'], ondelete='CASCADE')
    op.alter_column('restore_jobs', 'hypervisor_id', nullable=False)
    op.drop_column('restore_jobs', 'hypervisor_name')
    op.drop_constraint('job_vms_vm_id_fkey', 'job_vms', type_='foreignkey')
    op.execute("DELETE FROM job_vms WHERE vm_id IS NULL")
    op.create_foreign_key('job_vms_vm_id_fkey', 'job_vms', 'vms', ['vm_id'], ['id'], ondelete='CASCADE')
    op.alter_column('job_vms', 'vm_id', nullable=False)
    op.alter_column('api_tokens', 'expires', nullable=True)
    op.execute("DROP TRIGGER audit_log_no_truncate ON audit_log")
    op.execute("DROP TRIGGER audit_log_append_only ON audit_log")
    op.execute("DROP FUNCTION vmkeep_audit_append_only()")
    op.drop_column('audit_log', 'hash')
    op.drop_column('audit_log', 'prev_hash')
    op.drop_column('hypervisors', 'restore_locations')
    op.drop_column('hypervisors', 'allow_unsafe_options')
    op.drop_column('hypervisors', 'allow_plain_tcp')
