"""backup copies: a policy's copy targets (another repository, after each backup or on a cron,
with its own retention), copy runs as maintenance runs with a target repository, which job's
copies were queued, and restores that may use a copy of their point

A copy of a point is the same (name, point_id) in another repository: a restore_points row with
that repository's id, written by the proxy that copied it (its role inserts restore points
already). The proxy reads the target of a copy run it is doing, and the repositories holding the
point of a restore it is doing, through two views with their owner's rights (as 0010/0015): its
role still has no grant on repositories.

Revision ID: 0019
Revises: 0018
"""

import sqlalchemy as sa
from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None

COPY_WORK = """
CREATE VIEW proxy_copy_work WITH (security_barrier = true) AS
SELECT m.id AS run_id,
       r.id AS repository_id, r.name AS repository, r.location AS repository_location,
       r.s3_endpoint AS repository_s3_endpoint, r.passphrase_sealed AS repository_passphrase_sealed,
       r.repo_id AS repository_repo_id, r.encrypted AS repository_encrypted
FROM maintenance_runs m
JOIN repositories r ON r.id = m.target_repository_id
WHERE m.kind = 'copy' AND m.status IN ('queued', 'running')
"""

# Every repository that holds the restore's point, the restore's own first: a restore that may use
# copies (use_copies) sees them all, another only its own.
RESTORE_SOURCES = """
CREATE VIEW proxy_restore_sources WITH (security_barrier = true) AS
SELECT rj.id AS restore_id, (r.id = rj.repository_id) AS is_primary,
       r.id AS repository_id, r.name AS repository, r.location AS repository_location,
       r.s3_endpoint AS repository_s3_endpoint, r.passphrase_sealed AS repository_passphrase_sealed,
       r.repo_id AS repository_repo_id, r.encrypted AS repository_encrypted
FROM restore_jobs rj
JOIN restore_points p ON p.name = rj.vm_name AND p.point_id = rj.point_id
JOIN repositories r ON r.id = p.repository_id
WHERE rj.status IN ('queued', 'running') AND (rj.use_copies OR r.id = rj.repository_id)
"""


def upgrade() -> None:
    op.create_table(
        'policy_copy_targets',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('policy_id', sa.Integer(), nullable=False),
        sa.Column('repository_id', sa.Integer(), nullable=False),
        sa.Column('schedule', sa.String(length=100), nullable=False, server_default='after-backup'),
        sa.Column('retention', sa.JSON(), nullable=False, server_default='{}'),
        sa.Column('next_run', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['policy_id'], ['policies.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['repository_id'], ['repositories.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('policy_id', 'repository_id'),
    )
    op.create_index('ix_policy_copy_targets_next_run', 'policy_copy_targets', ['next_run'])
    op.add_column('maintenance_runs', sa.Column('target_repository_id', sa.Integer(), nullable=True))
    op.add_column('maintenance_runs', sa.Column('target_repository_name', sa.String(length=200), nullable=True))
    op.create_foreign_key('maintenance_runs_target_repository_id_fkey', 'maintenance_runs', 'repositories',
                          ['target_repository_id'], ['id'], ondelete='SET NULL')
    # a finished run's copies were queued (or it had none to queue): runs that ended before copies
    # existed are done with
    op.add_column('jobs', sa.Column('copies_queued', sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET copies_queued = finished WHERE finished IS NOT NULL")
    op.create_index('ix_jobs_copies_pending', 'jobs', ['id'], postgresql_where=sa.text('copies_queued IS NULL'))
    op.add_column('restore_jobs', sa.Column('use_copies', sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column('restore_jobs', sa.Column('source_repository', sa.String(length=200), nullable=True))
    op.create_index('ix_restore_points_name_point', 'restore_points', ['name', 'point_id'])
    op.execute(COPY_WORK)
    op.execute(RESTORE_SOURCES)


def downgrade() -> None:
    op.execute("DROP VIEW proxy_restore_sources")
    op.execute("DROP VIEW proxy_copy_work")
    op.drop_index('ix_restore_points_name_point', table_name='restore_points')
    op.drop_column('restore_jobs', 'source_repository')
    op.drop_column('restore_jobs', 'use_copies')
    op.drop_index('ix_jobs_copies_pending', table_name='jobs')
    op.drop_column('jobs', 'copies_queued')
    op.drop_constraint('maintenance_runs_target_repository_id_fkey', 'maintenance_runs', type_='foreignkey')
    op.drop_column('maintenance_runs', 'target_repository_name')
    op.drop_column('maintenance_runs', 'target_repository_id')
    op.drop_index('ix_policy_copy_targets_next_run', table_name='policy_copy_targets')
    op.drop_table('policy_copy_targets')
