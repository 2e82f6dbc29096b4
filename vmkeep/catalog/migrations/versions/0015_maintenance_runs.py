"""repository maintenance (verify, prune, GC, usage) run by proxies and recorded in the catalog;
what each VM's points take of a repository, as the last usage run measured it

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None

# What a proxy needs to run one maintenance task, and nothing more: the repository's location and
# sealed passphrase, through a view with its owner's rights (the proxies' role has no grant on
# repositories), only while the run is queued or running (as proxy_restore_work, 0010/0011).
WORK = """
CREATE VIEW proxy_maintenance_work WITH (security_barrier = true) AS
SELECT m.id AS run_id, m.kind, m.params,
       r.id AS repository_id, r.name AS repository, r.location AS repository_location,
       r.s3_endpoint AS repository_s3_endpoint, r.passphrase_sealed AS repository_passphrase_sealed,
       r.repo_id AS repository_repo_id, r.encrypted AS repository_encrypted
FROM maintenance_runs m
JOIN repositories r ON r.id = m.repository_id
WHERE m.status IN ('queued', 'running')
"""

# A run that reaches 'succeeded' updates what the catalog shows of its repository, with the
# function owner's rights (the proxies' role cannot touch repositories): a GC takes the bytes it
# freed off the repository's used bytes; a usage run's per-name figures replace the repository's
# rows in repository_usage (and leave its result, which the pages read whole, small).
SETTLE = """
CREATE OR REPLACE FUNCTION vmkeep_maintenance_settle() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public AS $$
BEGIN
    IF NEW.status = 'succeeded' AND OLD.status IS DISTINCT FROM 'succeeded' AND NEW.result IS NOT NULL THEN
        IF NEW.kind = 'gc' THEN
            UPDATE repositories SET used_bytes = GREATEST(COALESCE(used_bytes, 0)
                                                         - COALESCE((NEW.result->>'bytes_freed')::bigint, 0), 0)
            WHERE id = NEW.repository_id;
        ELSIF NEW.kind = 'usage' AND (NEW.result::jsonb) ? 'names' THEN
            DELETE FROM repository_usage WHERE repository_id = NEW.repository_id;
            INSERT INTO repository_usage (repository_id, name, points, logical_bytes, referenced_bytes,
                                          unique_bytes, shared_bytes, run_id)
            SELECT NEW.repository_id, n.key, (n.value->>'points')::int, (n.value->>'logical_bytes')::bigint,
                   (n.value->>'referenced_bytes')::bigint, (n.value->>'unique_stored')::bigint,
                   (n.value->>'shared_stored')::bigint, NEW.id
            FROM jsonb_each(NEW.result::jsonb->'names') AS n
            WHERE NEW.repository_id IS NOT NULL;
            NEW.result := (NEW.result::jsonb - 'names')::json;
        END IF;
    END IF;
    RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION vmkeep_maintenance_settle() FROM PUBLIC;
CREATE TRIGGER maintenance_runs_settle BEFORE UPDATE OF status ON maintenance_runs
    FOR EACH ROW EXECUTE FUNCTION vmkeep_maintenance_settle();
CREATE TRIGGER maintenance_runs_forward_only BEFORE UPDATE ON maintenance_runs
    FOR EACH ROW EXECUTE FUNCTION vmkeep_forward_only();
"""


def upgrade() -> None:
    op.create_table(
        'maintenance_runs',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('repository_id', sa.Integer(), nullable=True),
        sa.Column('repository_name', sa.String(length=200), nullable=False),
        sa.Column('kind', sa.String(length=20), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False, server_default='{}'),
        sa.Column('requested_by', sa.String(length=100), nullable=False),
        sa.Column('proxy', sa.String(length=100), nullable=True),
        sa.Column('status', sa.String(length=20), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('task_id', sa.BigInteger(), nullable=True),
        sa.Column('progress_bytes', sa.BigInteger(), nullable=True),
        sa.Column('total_bytes', sa.BigInteger(), nullable=True),
        sa.Column('result', sa.JSON(), nullable=True),
        sa.Column('error', sa.String(length=4000), nullable=True),
        sa.Column('created', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('started', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['repository_id'], ['repositories.id'], ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_maintenance_runs_repository', 'maintenance_runs', ['repository_id', 'kind', 'id'])
    op.create_table(
        'repository_usage',
        sa.Column('repository_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('points', sa.Integer(), nullable=False),
        sa.Column('logical_bytes', sa.BigInteger(), nullable=False),
        sa.Column('referenced_bytes', sa.BigInteger(), nullable=False),
        sa.Column('unique_bytes', sa.BigInteger(), nullable=False),
        sa.Column('shared_bytes', sa.BigInteger(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['repository_id'], ['repositories.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['run_id'], ['maintenance_runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('repository_id', 'name'),
    )
    op.execute(WORK)
    op.execute(SETTLE)


def downgrade() -> None:
    op.execute("DROP TRIGGER maintenance_runs_forward_only ON maintenance_runs")
    op.execute("DROP TRIGGER maintenance_runs_settle ON maintenance_runs")
    op.execute("DROP FUNCTION vmkeep_maintenance_settle()")
    op.execute("DROP VIEW proxy_maintenance_work")
    op.drop_table('repository_usage')
    op.drop_index('ix_maintenance_runs_repository', table_name='maintenance_runs')
    op.drop_table('maintenance_runs')
