"""VM replicas through the server: a policy's replica target (a registered libvirt hypervisor,
storage, network, name pattern) and a row per replica with its state, point and last sync.

A proxy does each sync (and each failover asked through the API): it reads its replica's row,
and through a view with its owner's rights (as 0010/0015/0019) the target hypervisor's sealed
login and, for a sync only, the policy repository's sealed passphrase; it writes only the outcome
columns of the row (proxy_role grants them), and moves it forward only (0011's trigger: an ended
sync is the master's).

Revision ID: 0020
Revises: 0019
"""

import sqlalchemy as sa
from alembic import op

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None

# the repository (its sealed passphrase) only for a sync: a failover reads no repository, and
# works when the policy's repository is gone (the primary site lost)
REPLICA_WORK = """
CREATE VIEW proxy_replica_work WITH (security_barrier = true) AS
SELECT rp.id AS replica_id, rp.task_id, rp.vm_name, rp.replica_name, rp.policy_name, rp.pending_point, rp.storage,
       rp.network, rp.action, rp.failover_network,
       h.name AS hypervisor, h.kind AS hypervisor_kind, h.uri AS hypervisor_uri, h.username AS hypervisor_username,
       h.secret_sealed AS hypervisor_secret_sealed, h.allow_plain_tcp, h.allow_unsafe_options,
       r.id AS repository_id, r.name AS repository, r.location AS repository_location,
       r.s3_endpoint AS repository_s3_endpoint, r.passphrase_sealed AS repository_passphrase_sealed,
       r.repo_id AS repository_repo_id, r.encrypted AS repository_encrypted
FROM replicas rp
JOIN hypervisors h ON h.id = rp.hypervisor_id
LEFT JOIN repositories r ON r.id = rp.repository_id AND rp.action = 'sync'
WHERE rp.status IN ('queued', 'running')
"""


def upgrade() -> None:
    op.create_table(
        'policy_replica_targets',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('policy_id', sa.Integer(), nullable=False),
        sa.Column('hypervisor_id', sa.Integer(), nullable=False),
        sa.Column('storage', sa.String(length=1000), nullable=True),
        sa.Column('network', sa.String(length=200), nullable=True),
        sa.Column('name_pattern', sa.String(length=200), nullable=False, server_default='{vm}-replica'),
        sa.Column('last_job_id', sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(['policy_id'], ['policies.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['hypervisor_id'], ['hypervisors.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('policy_id'),
    )
    op.create_table(
        'replicas',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('vm_name', sa.String(length=200), nullable=False),
        sa.Column('policy_id', sa.Integer(), nullable=True),
        sa.Column('policy_name', sa.String(length=100), nullable=False),
        sa.Column('hypervisor_id', sa.Integer(), nullable=True),
        sa.Column('hypervisor_name', sa.String(length=200), nullable=False),
        sa.Column('replica_name', sa.String(length=200), nullable=False),
        sa.Column('repository_id', sa.Integer(), nullable=True),
        sa.Column('repository_name', sa.String(length=200), nullable=False),
        sa.Column('storage', sa.String(length=1000), nullable=True),
        sa.Column('network', sa.String(length=200), nullable=True),
        sa.Column('point_id', sa.String(length=64), nullable=True),
        sa.Column('pending_point', sa.String(length=64), nullable=True),
        sa.Column('state', sa.String(length=20), nullable=True),
        sa.Column('status', sa.String(length=20), nullable=False),
        sa.Column('action', sa.String(length=20), nullable=False, server_default='sync'),
        sa.Column('failover_network', sa.String(length=200), nullable=True),
        sa.Column('mode', sa.String(length=20), nullable=True),
        sa.Column('bytes_written', sa.BigInteger(), nullable=True),
        sa.Column('job_id', sa.Integer(), nullable=True),
        sa.Column('proxy', sa.String(length=100), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('task_id', sa.BigInteger(), nullable=True),
        sa.Column('progress_bytes', sa.BigInteger(), nullable=True),
        sa.Column('total_bytes', sa.BigInteger(), nullable=True),
        sa.Column('error', sa.String(length=4000), nullable=True),
        sa.Column('updated', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['policy_id'], ['policies.id'], ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['hypervisor_id'], ['hypervisors.id'], ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['repository_id'], ['repositories.id'], ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('hypervisor_id', 'replica_name', 'vm_name'),
    )
    op.create_index('ix_replicas_vm_name', 'replicas', ['vm_name'])
    op.execute(REPLICA_WORK)
    op.execute("CREATE TRIGGER replicas_forward_only BEFORE UPDATE ON replicas "
               "FOR EACH ROW EXECUTE FUNCTION vmkeep_forward_only()")


def downgrade() -> None:
    op.execute("DROP TRIGGER replicas_forward_only ON replicas")
    op.execute("DROP VIEW proxy_replica_work")
    op.drop_index('ix_replicas_vm_name', table_name='replicas')
    op.drop_table('replicas')
    op.drop_table('policy_replica_targets')
