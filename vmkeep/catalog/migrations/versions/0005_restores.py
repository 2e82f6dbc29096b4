"""restores through the server

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('restore_jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('requested_by', sa.String(length=100), nullable=False),
    sa.Column('vm_name', sa.String(length=200), nullable=False),
    sa.Column('point_id', sa.String(length=64), nullable=False),
    sa.Column('repository_id', sa.Integer(), nullable=False),
    sa.Column('hypervisor_id', sa.Integer(), nullable=False),
    sa.Column('mode', sa.String(length=20), nullable=False),
    sa.Column('new_name', sa.String(length=200), nullable=True),
    sa.Column('storage', sa.String(length=1000), nullable=True),
    sa.Column('start_vm', sa.Boolean(), nullable=False),
    sa.Column('proxy', sa.String(length=100), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('task_id', sa.BigInteger(), nullable=True),
    sa.Column('error', sa.String(length=4000), nullable=True),
    sa.Column('disks', sa.JSON(), nullable=True),
    sa.Column('created', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['hypervisor_id'], ['hypervisors.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['repository_id'], ['repositories.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('restore_jobs')
