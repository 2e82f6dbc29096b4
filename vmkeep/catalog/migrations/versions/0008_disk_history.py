"""per-disk outcome of a VM's backup, storage a proxy sees, job history outliving its policy

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('job_vms', sa.Column('disks', sa.JSON(), nullable=True))
    op.add_column('proxies', sa.Column('storage', sa.JSON(), nullable=False, server_default='[]'))
    op.add_column('jobs', sa.Column('policy_name', sa.String(length=100), nullable=False, server_default=''))
    op.execute("UPDATE jobs SET policy_name = policies.name FROM policies WHERE policies.id = jobs.policy_id")
    op.alter_column('jobs', 'policy_id', existing_type=sa.Integer(), nullable=True)
    op.drop_constraint('jobs_policy_id_fkey', 'jobs', type_='foreignkey')
    op.create_foreign_key('jobs_policy_id_fkey', 'jobs', 'policies', ['policy_id'], ['id'], ondelete='SET NULL')


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE policy_id IS NULL")
    op.drop_constraint('jobs_policy_id_fkey', 'jobs', type_='foreignkey')
    op.create_foreign_key('jobs_policy_id_fkey', 'jobs', 'policies', ['policy_id'], ['id'], ondelete='CASCADE')
    op.alter_column('jobs', 'policy_id', existing_type=sa.Integer(), nullable=False)
    op.drop_column('jobs', 'policy_name')
    op.drop_column('proxies', 'storage')
    op.drop_column('job_vms', 'disks')
