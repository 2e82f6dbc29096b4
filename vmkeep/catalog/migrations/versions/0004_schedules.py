"""schedules and notifications

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('hypervisors', sa.Column('discovery_minutes', sa.Integer(), server_default='60', nullable=False))
    op.add_column('jobs', sa.Column('notified_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('notify_error', sa.String(length=2000), nullable=True))
    op.add_column('policies', sa.Column('next_run', sa.DateTime(timezone=True), nullable=True))
    op.add_column('policies', sa.Column('notify_webhook', sa.String(length=2000), nullable=True))
    op.add_column('policies', sa.Column('notify_email', sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column('policies', 'notify_email')
    op.drop_column('policies', 'notify_webhook')
    op.drop_column('policies', 'next_run')
    op.drop_column('jobs', 'notify_error')
    op.drop_column('jobs', 'notified_at')
    op.drop_column('hypervisors', 'discovery_minutes')
