"""where a restore as a new VM goes besides its storage (network, host, folder), and an index on
restore_points.point_id for a point looked up by id or id prefix

The proxy reads restore_jobs itself (SELECT on the table, migration 0011): the new columns reach
it without a change to its role. The index uses text_pattern_ops, so ``point_id LIKE 'prefix%'``
(a restore's "point id or unique prefix") is a range scan whatever the database's collation.

Revision ID: 0018
Revises: 0017
"""

import sqlalchemy as sa
from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('restore_jobs', sa.Column('network', sa.String(length=200), nullable=True))
    op.add_column('restore_jobs', sa.Column('host', sa.String(length=200), nullable=True))
    op.add_column('restore_jobs', sa.Column('folder', sa.String(length=500), nullable=True))
    op.create_index('ix_restore_points_point_id', 'restore_points', ['point_id'],
                    postgresql_ops={'point_id': 'text_pattern_ops'})


def downgrade() -> None:
    op.drop_index('ix_restore_points_point_id', table_name='restore_points')
    op.drop_column('restore_jobs', 'folder')
    op.drop_column('restore_jobs', 'host')
    op.drop_column('restore_jobs', 'network')
