"""a repository's used bytes follow the backups the proxies finish

Revision ID: 0012
Revises: 0011
"""

from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

# A backup row that reaches 'succeeded' adds what it stored to its policy's repository, in the
# same transaction as its outcome (a rebuild of the catalog counts the chunks again, and GC's
# savings show after the next one). The proxies' role may not touch repositories: the function
# runs with its owner's rights, and does only this. The forward-only trigger (0011) lets a row
# reach 'succeeded' once.
STORED = """
CREATE OR REPLACE FUNCTION vmkeep_count_stored() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public AS $$
BEGIN
    IF NEW.status = 'succeeded' AND OLD.status IS DISTINCT FROM 'succeeded' AND COALESCE(NEW.stored_bytes, 0) > 0 THEN
        UPDATE repositories r SET used_bytes = COALESCE(r.used_bytes, 0) + NEW.stored_bytes
        FROM jobs j JOIN policies p ON p.id = j.policy_id
        WHERE j.id = NEW.job_id AND r.id = p.repository_id;
    END IF;
    RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION vmkeep_count_stored() FROM PUBLIC;
CREATE TRIGGER job_vms_count_stored AFTER UPDATE OF status ON job_vms
    FOR EACH ROW EXECUTE FUNCTION vmkeep_count_stored();
"""


def upgrade() -> None:
    op.execute(STORED)


def downgrade() -> None:
    op.execute("DROP TRIGGER job_vms_count_stored ON job_vms")
    op.execute("DROP FUNCTION vmkeep_count_stored()")
