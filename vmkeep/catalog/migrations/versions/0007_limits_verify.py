"""datastore and proxy limits, verify after backup, restore attempts and progress

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('policies', sa.Column('max_per_datastore', sa.Integer(), nullable=True))
    op.add_column('policies', sa.Column('max_per_proxy', sa.Integer(), nullable=True))
    op.add_column('policies', sa.Column('verify_after', sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column('job_vms', sa.Column('verified', sa.Boolean(), nullable=True))
    op.add_column('restore_jobs', sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'))
    op.add_column('restore_jobs', sa.Column('warnings', sa.JSON(), nullable=False, server_default='[]'))
    op.add_column('restore_jobs', sa.Column('progress_bytes', sa.BigInteger(), nullable=True))
    op.add_column('restore_jobs', sa.Column('total_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column('restore_jobs', 'total_bytes')
    op.drop_column('restore_jobs', 'progress_bytes')
    op.drop_column('restore_jobs', 'warnings')
    op.drop_column('restore_jobs', 'attempts')
    op.drop_column('job_vms', 'verified')
    op.drop_column('policies', 'verify_after')
    op.drop_column('policies', 'max_per_proxy')
    op.drop_column('policies', 'max_per_datastore')
