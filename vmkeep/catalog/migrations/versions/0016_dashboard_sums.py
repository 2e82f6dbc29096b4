"""what the restore points of each repository and day add up to, each name's newest point per
repository, and how many backups ended each day by outcome, kept by the database; each VM's newest
outcome indexed

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def point_triggers(function: str, prefix: str) -> str:
    """Statement triggers that give ``function`` the rows each insert, delete and update of
    restore points changed."""
    return "\n".join(
        f"CREATE TRIGGER {prefix}_{op.lower()} AFTER {op} ON restore_points REFERENCING {tables}\n"
        f"    FOR EACH STATEMENT EXECUTE FUNCTION {function}();"
        for op, tables in (("INSERT", "NEW TABLE AS new_points"), ("DELETE", "OLD TABLE AS old_points"),
                           ("UPDATE", "OLD TABLE AS old_points NEW TABLE AS new_points")))


# The console's dashboard shows each repository's dedup and compression ratios, a 30-day growth
# chart, the VMs whose newest point is too old and success rates over 7 and 30 days; summing a
# million points and a month of backups, and looking up 10,000 VMs' newest points, for each view
# took 500 ms. Triggers keep the sums in the same transaction as the rows (a COPY of a
# million points is one grouped upsert). Proxies add points and end backups with their own role,
# which has no grant on these tables: the functions run with their owner's rights and do only this
# (as vmkeep_count_stored, 0012). A day is a UTC date.
DAYS = """
CREATE OR REPLACE FUNCTION vmkeep_point_days() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        UPDATE point_days d SET points = d.points - o.points, logical_bytes = d.logical_bytes - o.logical_bytes,
               read_bytes = d.read_bytes - o.read_bytes, stored_bytes = d.stored_bytes - o.stored_bytes
        FROM (SELECT repository_id, (created AT TIME ZONE 'UTC')::date AS day, count(*) AS points,
                     sum(logical_bytes) AS logical_bytes, COALESCE(sum(read_bytes), 0) AS read_bytes,
                     COALESCE(sum(stored_bytes), 0) AS stored_bytes
              FROM old_points GROUP BY 1, 2) o
        WHERE d.repository_id = o.repository_id AND d.day = o.day;
        DELETE FROM point_days WHERE points <= 0;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO point_days AS d (repository_id, day, points, logical_bytes, read_bytes, stored_bytes)
        SELECT repository_id, (created AT TIME ZONE 'UTC')::date, count(*), sum(logical_bytes),
               COALESCE(sum(read_bytes), 0), COALESCE(sum(stored_bytes), 0)
        FROM new_points GROUP BY 1, 2
        ON CONFLICT (repository_id, day) DO UPDATE SET points = d.points + EXCLUDED.points,
            logical_bytes = d.logical_bytes + EXCLUDED.logical_bytes, read_bytes = d.read_bytes + EXCLUDED.read_bytes,
            stored_bytes = d.stored_bytes + EXCLUDED.stored_bytes;
    END IF;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION vmkeep_point_days() FROM PUBLIC;
""" + point_triggers("vmkeep_point_days", "restore_points_days") + """
INSERT INTO point_days (repository_id, day, points, logical_bytes, read_bytes, stored_bytes)
SELECT repository_id, (created AT TIME ZONE 'UTC')::date, count(*), sum(logical_bytes), COALESCE(sum(read_bytes), 0),
       COALESCE(sum(stored_bytes), 0)
FROM restore_points GROUP BY 1, 2;
"""

# a name's newest point in a repository: a new point can only make it newer; a pruned one makes
# the database look again at that name's points (ix_restore_points_name_created)
NEWEST = """
CREATE OR REPLACE FUNCTION vmkeep_newest_points() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        WITH gone AS (SELECT DISTINCT repository_id, name FROM old_points),
             still AS (SELECT g.repository_id, g.name,
                              (SELECT max(p.created) FROM restore_points p
                               WHERE p.name = g.name AND p.repository_id = g.repository_id) AS created
                       FROM gone g),
             emptied AS (DELETE FROM newest_points n USING still s
                         WHERE n.repository_id = s.repository_id AND n.name = s.name AND s.created IS NULL)
        UPDATE newest_points n SET created = s.created FROM still s
        WHERE n.repository_id = s.repository_id AND n.name = s.name AND s.created IS NOT NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO newest_points AS n (repository_id, name, created)
        SELECT repository_id, name, max(created) FROM new_points GROUP BY 1, 2
        ON CONFLICT (repository_id, name) DO UPDATE SET created = greatest(n.created, EXCLUDED.created);
    END IF;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION vmkeep_newest_points() FROM PUBLIC;
""" + point_triggers("vmkeep_newest_points", "restore_points_newest") + """
INSERT INTO newest_points (repository_id, name, created)
SELECT repository_id, name, max(created) FROM restore_points GROUP BY 1, 2;
"""

# a backup counts on the day it ended while its status is an outcome; the master may send one back
# to the queue (a retry), which takes its count back
BACKUPS = """
CREATE OR REPLACE FUNCTION vmkeep_backup_days() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public AS $$
BEGIN
    IF TG_LEVEL = 'ROW' THEN
        IF OLD.status IN ('succeeded', 'failed') AND OLD.finished IS NOT NULL THEN
            UPDATE backup_days SET succeeded = succeeded - (OLD.status = 'succeeded')::int,
                                   failed = failed - (OLD.status = 'failed')::int
            WHERE day = (OLD.finished AT TIME ZONE 'UTC')::date;
        END IF;
        IF NEW.status IN ('succeeded', 'failed') AND NEW.finished IS NOT NULL THEN
            INSERT INTO backup_days AS d (day, succeeded, failed)
            VALUES ((NEW.finished AT TIME ZONE 'UTC')::date, (NEW.status = 'succeeded')::int,
                    (NEW.status = 'failed')::int)
            ON CONFLICT (day) DO UPDATE SET succeeded = d.succeeded + EXCLUDED.succeeded,
                                            failed = d.failed + EXCLUDED.failed;
        END IF;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO backup_days AS d (day, succeeded, failed)
        SELECT (finished AT TIME ZONE 'UTC')::date, count(*) FILTER (WHERE status = 'succeeded'),
               count(*) FILTER (WHERE status = 'failed')
        FROM new_backups WHERE status IN ('succeeded', 'failed') AND finished IS NOT NULL GROUP BY 1
        ON CONFLICT (day) DO UPDATE SET succeeded = d.succeeded + EXCLUDED.succeeded,
                                        failed = d.failed + EXCLUDED.failed;
    ELSE
        UPDATE backup_days d SET succeeded = d.succeeded - o.succeeded, failed = d.failed - o.failed
        FROM (SELECT (finished AT TIME ZONE 'UTC')::date AS day,
                     count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                     count(*) FILTER (WHERE status = 'failed') AS failed
              FROM old_backups WHERE status IN ('succeeded', 'failed') AND finished IS NOT NULL GROUP BY 1) o
        WHERE d.day = o.day;
    END IF;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION vmkeep_backup_days() FROM PUBLIC;
CREATE TRIGGER job_vms_days_insert AFTER INSERT ON job_vms REFERENCING NEW TABLE AS new_backups
    FOR EACH STATEMENT EXECUTE FUNCTION vmkeep_backup_days();
CREATE TRIGGER job_vms_days_delete AFTER DELETE ON job_vms REFERENCING OLD TABLE AS old_backups
    FOR EACH STATEMENT EXECUTE FUNCTION vmkeep_backup_days();
CREATE TRIGGER job_vms_days_update AFTER UPDATE OF status, finished ON job_vms FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.finished IS DISTINCT FROM NEW.finished)
    EXECUTE FUNCTION vmkeep_backup_days();
INSERT INTO backup_days (day, succeeded, failed)
SELECT (finished AT TIME ZONE 'UTC')::date, count(*) FILTER (WHERE status = 'succeeded'),
       count(*) FILTER (WHERE status = 'failed')
FROM job_vms WHERE status IN ('succeeded', 'failed') AND finished IS NOT NULL GROUP BY 1;
"""


def upgrade() -> None:
    op.create_table(
        'point_days',
        sa.Column('repository_id', sa.Integer(), nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('points', sa.BigInteger(), nullable=False),
        sa.Column('logical_bytes', sa.BigInteger(), nullable=False),
        sa.Column('read_bytes', sa.BigInteger(), nullable=False),
        sa.Column('stored_bytes', sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(['repository_id'], ['repositories.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('repository_id', 'day'),
    )
    op.execute(DAYS)
    op.create_table(
        'newest_points',
        sa.Column('repository_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('created', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['repository_id'], ['repositories.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('repository_id', 'name'),
    )
    op.create_index('ix_newest_points_name', 'newest_points', ['name'])
    op.execute(NEWEST)
    op.create_table(
        'backup_days',
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('succeeded', sa.BigInteger(), nullable=False),
        sa.Column('failed', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('day'),
    )
    op.execute(BACKUPS)
    op.create_index('ix_job_vms_outcomes', 'job_vms', ['vm_id', 'id'], postgresql_include=['status'],
                    postgresql_where=sa.text("status IN ('succeeded', 'failed')"))


def downgrade() -> None:
    op.drop_index('ix_job_vms_outcomes', table_name='job_vms')
    for trigger in ("insert", "delete", "update"):
        op.execute(f"DROP TRIGGER job_vms_days_{trigger} ON job_vms")
    op.execute("DROP FUNCTION vmkeep_backup_days()")
    op.drop_table('backup_days')
    for trigger in ("insert", "delete", "update"):
        op.execute(f"DROP TRIGGER restore_points_newest_{trigger} ON restore_points")
    op.execute("DROP FUNCTION vmkeep_newest_points()")
    op.drop_table('newest_points')
    for trigger in ("insert", "delete", "update"):
        op.execute(f"DROP TRIGGER restore_points_days_{trigger} ON restore_points")
    op.execute("DROP FUNCTION vmkeep_point_days()")
    op.drop_table('point_days')
