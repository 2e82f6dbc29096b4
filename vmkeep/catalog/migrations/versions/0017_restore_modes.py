"""restores of one disk to a file (which disk, in which format) and instant recoveries (the step
the proxy is to do next: start, finish or discard)

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # mode 'disk-file': storage is the directory, new_name the file's name
    op.add_column('restore_jobs', sa.Column('disk', sa.String(length=200), nullable=True))
    op.add_column('restore_jobs', sa.Column('format', sa.String(length=10), nullable=True))
    # mode 'instant': start, then finish or discard, each a task of the same proxy (its state is there)
    op.add_column('restore_jobs', sa.Column('step', sa.String(length=10), nullable=True))


def downgrade() -> None:
    op.drop_column('restore_jobs', 'step')
    op.drop_column('restore_jobs', 'format')
    op.drop_column('restore_jobs', 'disk')
