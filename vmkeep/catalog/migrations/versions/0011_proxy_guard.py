"""the proxies' role: views that leak nothing through pushed-down conditions, and job rows it may
move forward only

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

# Only the tables' owner (the master) may touch a backup or restore that has ended, or send one
# back to be done again; anyone else (the proxies' role) moves rows forward: queued → running →
# an outcome. Without this, a proxy's login could set an old restore back to queued and read its
# work order again, or have it re-run.
FORWARD_ONLY = """
CREATE OR REPLACE FUNCTION vmkeep_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_has_role(current_user, (SELECT tableowner FROM pg_tables
                                  WHERE schemaname = TG_TABLE_SCHEMA AND tablename = TG_TABLE_NAME), 'USAGE') THEN
        RETURN NEW;
    END IF;
    IF OLD.status NOT IN ('queued', 'running') THEN
        RAISE EXCEPTION '% row % has ended (%): only the master changes it', TG_TABLE_NAME, OLD.id, OLD.status
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.status = 'queued' AND OLD.status <> 'queued' THEN
        RAISE EXCEPTION '% row %: only the master sends work back to the queue', TG_TABLE_NAME, OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER job_vms_forward_only BEFORE UPDATE ON job_vms
    FOR EACH ROW EXECUTE FUNCTION vmkeep_forward_only();
CREATE TRIGGER restore_jobs_forward_only BEFORE UPDATE ON restore_jobs
    FOR EACH ROW EXECUTE FUNCTION vmkeep_forward_only();
"""


def upgrade() -> None:
    # a caller's WHERE must not run on rows a view hides (its errors would show their values)
    op.execute("ALTER VIEW proxy_backup_work SET (security_barrier = true)")
    op.execute("ALTER VIEW proxy_restore_work SET (security_barrier = true)")
    op.execute(FORWARD_ONLY)


def downgrade() -> None:
    op.execute("DROP TRIGGER restore_jobs_forward_only ON restore_jobs")
    op.execute("DROP TRIGGER job_vms_forward_only ON job_vms")
    op.execute("DROP FUNCTION vmkeep_forward_only()")
    op.execute("ALTER VIEW proxy_restore_work RESET (security_barrier)")
    op.execute("ALTER VIEW proxy_backup_work RESET (security_barrier)")
