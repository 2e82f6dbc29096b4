"""boot checks after backups

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('policies', sa.Column('verify_boot', sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column('job_vms', sa.Column('boot_check', sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column('job_vms', 'boot_check')
    op.drop_column('policies', 'verify_boot')
