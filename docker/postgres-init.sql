-- The roles and database of a `docker compose` deployment. The postgres image runs this once, as
-- its superuser `postgres`, when its data volume is empty; `postgres` is for administration only.
--
--   adqueue         the application (workers, CLI): owns the database and migrates its schema
--   adqueue_reader  `adqueue sql` (ADQUEUE_SQL_DATABASE_URL): may connect and read, nothing else
--
-- Change these passwords here and in docker-compose.yml's URLs before the port is reachable by others.

CREATE ROLE adqueue LOGIN PASSWORD 'adqueue' NOSUPERUSER NOCREATEDB NOCREATEROLE;
CREATE ROLE adqueue_reader LOGIN PASSWORD 'adqueue_reader' NOSUPERUSER NOCREATEDB NOCREATEROLE
    CONNECTION LIMIT 20;
-- Whatever client uses the reader's login, its transactions are read-only and time-limited
-- (`adqueue sql --timeout` sets its own limit over this one).
ALTER ROLE adqueue_reader SET default_transaction_read_only = on;
ALTER ROLE adqueue_reader SET statement_timeout = '60s';

CREATE DATABASE adqueue OWNER adqueue;
REVOKE ALL ON DATABASE adqueue FROM PUBLIC;
GRANT CONNECT ON DATABASE adqueue TO adqueue_reader;

\connect adqueue
-- PostgreSQL 15+ already keeps PUBLIC from creating in schema public; older servers do not.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO adqueue_reader;
-- The tables come later, from adqueue's first migration: SELECT on every table adqueue creates
-- here (and on any that exist already, when this is run by hand on an older database).
ALTER DEFAULT PRIVILEGES FOR ROLE adqueue IN SCHEMA public GRANT SELECT ON TABLES TO adqueue_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO adqueue_reader;
