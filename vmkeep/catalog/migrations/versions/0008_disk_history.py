"""per-disk outcome of a VM's backup, storage a proxy sees

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


def downgrade() -> None:
    op.drop_column('proxies', 'storage')
    op.drop_column('job_vms', 'disks')
