-- Database roles for Secure Messenger. Run once, as the RDS master user, connected to the
-- application database (DbName, default `messenger`) directly on the instance (not the proxy):
--
--   psql "host=<DbInstanceEndpoint> port=5432 dbname=messenger user=messenger_admin \
--         sslmode=verify-full sslrootcert=global-bundle.pem" -f infra/create-db-user.sql
--
-- Safe to run again. The role names must match the stacks' AppDbUser/MigrateDbUser (template.yaml
-- DbUser/DbMigrateUser); edit them below if you changed those parameters.
--
--   messenger_migrator  owns the schema; only the `migrate` function logs in as it.
--   messenger_app       the API and purge functions: read/write rows, no DDL.
-- Both log in only with IAM tokens (rds_iam), so neither has a password.

\set ON_ERROR_STOP on

BEGIN;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'messenger_migrator') THEN
        CREATE ROLE messenger_migrator LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'messenger_app') THEN
        CREATE ROLE messenger_app LOGIN;
    END IF;
    -- Only the two roles (and the master user) may connect to this database.
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO messenger_migrator, messenger_app',
                   current_database());
END
$$;

-- IAM authentication (RDS Proxy end-to-end IAM logs in with a token, not a password).
GRANT rds_iam TO messenger_migrator, messenger_app;

-- The migrator creates the tables in `public` (sqlx's _sqlx_migrations included) and owns them.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO messenger_migrator;
GRANT USAGE ON SCHEMA public TO messenger_app;

-- The master user needs membership to set default privileges on the migrator's behalf
-- (PostgreSQL 16+ no longer gives it implicitly to the role's creator).
GRANT messenger_migrator TO CURRENT_USER;

-- Whatever the migrations create later is usable by the app, with no DDL and no ownership.
ALTER DEFAULT PRIVILEGES FOR ROLE messenger_migrator IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO messenger_app;
ALTER DEFAULT PRIVILEGES FOR ROLE messenger_migrator IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO messenger_app;

-- And what already exists, for a re-run after migrations were applied.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO messenger_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO messenger_app;

-- Timeouts, the one place they are set (issue 10 item 7). Role settings, applied by the server
-- when a session of the role starts: no `SET` from the functions, so nothing pins an RDS Proxy
-- connection. infra/tests/test_timeouts.py holds them to template.yaml's Timeout of every function
-- that logs in as the role, and functions/tests/setup_roles.rs checks they are in place.
--
-- messenger_app: the API functions (Timeout 10 s) and purge (300 s). A statement ends before the
-- function can time out (5 s + DB_ACQUIRE_TIMEOUT_MS 1.5 s < 10 s), so no invocation leaves one
-- running behind it. purge deletes in 5,000-row batches, each one statement of about 25 ms
-- (1,000,000 rows in 4.6 s, `make test-purge-backlog`): 200 times under the limit (infra/README.md
-- "Timeouts"). A lock is waited for at most 2 s (then 503), and a transaction left open by a
-- function that died is closed after 5 s (the functions run single statements, no transaction).
ALTER ROLE messenger_app SET statement_timeout = '5s';
ALTER ROLE messenger_app SET lock_timeout = '2s';
ALTER ROLE messenger_app SET idle_in_transaction_session_timeout = '5s';
-- messenger_migrator: migrate (Timeout 300 s). A migration waits at most 5 s for a lock (rather
-- than queueing every request behind its ACCESS EXCLUSIVE lock; run it again), and no statement
-- outlives the function.
ALTER ROLE messenger_migrator SET statement_timeout = '280s';
ALTER ROLE messenger_migrator SET lock_timeout = '5s';
ALTER ROLE messenger_migrator SET idle_in_transaction_session_timeout = '60s';

COMMIT;
