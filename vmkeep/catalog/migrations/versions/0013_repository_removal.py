"""a repository can leave the catalog: its restores' history stays, by name

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

# DELETE /api/repositories/{name} removes the repository's row and its catalog points (the points
# stay in the repository itself; registering it again imports them). The restores made from it
# are history: they keep the repository's name, and their link to the row turns NULL.


def upgrade() -> None:
    op.add_column('restore_jobs', sa.Column('repository_name', sa.String(length=200), server_default='',
                                            nullable=False))
    op.execute("UPDATE restore_jobs SET repository_name = r.name FROM repositories r WHERE r.id = repository_id")
    op.alter_column('restore_jobs', 'repository_id', nullable=True)
    op.drop_constraint('restore_jobs_repository_id_fkey', 'restore_jobs', type_='foreignkey')
    op.create_foreign_key('restore_jobs_repository_id_fkey', 'restore_jobs', 'repositories', ['repository_id'],
                          ['id'], ondelete='SET NULL')


def downgrade() -> None:
    op.drop_constraint('restore_jobs_repository_id_fkey', 'restore_jobs', type_='foreignkey')
    op.execute("DELETE FROM restore_jobs WHERE repository_id IS NULL")
    op.create_foreign_key('restore_jobs_repository_id_fkey', 'restore_jobs', 'repositories', ['repository_id'],
                          ['id'], ondelete='CASCADE')
    op.alter_column('restore_jobs', 'repository_id', nullable=False)
    op.drop_column('restore_jobs', 'repository_name')
