"""the log lines of each VM's backup, written by the proxy that runs it; why a backup was full or
incremental; job history indexes

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None

MAX_LINES = 500  # per backup row: a looping failure cannot fill the catalog

# The proxy writes its INFO-and-above lines (secrets already masked by vmkeep.logs) while a backup
# runs; the database keeps at most MAX_LINES per backup row, whoever inserts them, so a proxy's
# login cannot grow the table without bound either. Lines beyond it are dropped silently: the
# first lines (what was decided) and the proxy's own stderr keep the rest. The proxies' role may
# only add lines: the count runs with the function owner's rights.
BOUNDED = f"""
CREATE OR REPLACE FUNCTION vmkeep_job_vm_logs_bounded() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public AS $$
BEGIN
    IF (SELECT count(*) FROM job_vm_logs WHERE job_vm_id = NEW.job_vm_id) >= {MAX_LINES} THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION vmkeep_job_vm_logs_bounded() FROM PUBLIC;
CREATE TRIGGER job_vm_logs_bounded BEFORE INSERT ON job_vm_logs
    FOR EACH ROW EXECUTE FUNCTION vmkeep_job_vm_logs_bounded();
"""


def upgrade() -> None:
    op.create_table(
        'job_vm_logs',
        sa.Column('id', sa.BigInteger(), nullable=False),
        sa.Column('job_vm_id', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('level', sa.String(length=10), nullable=False),
        sa.Column('logger', sa.String(length=200), nullable=False),
        sa.Column('message', sa.String(length=4000), nullable=False),
        sa.ForeignKeyConstraint(['job_vm_id'], ['job_vms.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_job_vm_logs_job_vm_id', 'job_vm_logs', ['job_vm_id', 'id'])
    op.execute(BOUNDED)
    # why the backup was full or incremental (the point's manifest says it too), for the job's page
    op.add_column('job_vms', sa.Column('mode_reason', sa.String(length=500), nullable=True))
    # a job's page reads its VMs; the history filters jobs by a VM's name
    op.create_index('ix_job_vms_job_id', 'job_vms', ['job_id'])
    op.create_index('ix_job_vms_vm_name', 'job_vms', ['vm_name'])


def downgrade() -> None:
    op.drop_index('ix_job_vms_vm_name', table_name='job_vms')
    op.drop_index('ix_job_vms_job_id', table_name='job_vms')
    op.drop_column('job_vms', 'mode_reason')
    op.drop_table('job_vm_logs')
    op.execute("DROP FUNCTION vmkeep_job_vm_logs_bounded()")
