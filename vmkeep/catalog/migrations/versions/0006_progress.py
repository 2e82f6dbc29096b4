"""live progress of job rows

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('job_vms', sa.Column('progress_bytes', sa.BigInteger(), nullable=True))
    op.add_column('job_vms', sa.Column('total_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column('job_vms', 'total_bytes')
    op.drop_column('job_vms', 'progress_bytes')
