#!/bin/bash
# Runs once, when the postgres container creates its data volume (docker-entrypoint-initdb.d), as
# the bootstrap superuser POSTGRES_USER. Creates the two login roles the deployment uses:
#
#   SCORELOOP_DB_USER (scoreloop)         the daemon: owns the schema its migrations build; no
#                                         superuser, no CREATEDB, no CREATEROLE, no replication
#   SCORELOOP_READONLY_USER (scoreloop_ro) people reading traces with psql: CONNECT, USAGE and
#                                         SELECT on every table, view and sequence, now and later
#
# Nobody else may connect to the database or create objects in its schema. Safe to run again
# (`docker compose exec postgres bash /docker-entrypoint-initdb.d/10-roles.sh`): it creates what
# is missing and resets passwords and attributes to what .env says.
set -euo pipefail

: "${POSTGRES_USER:?the postgres image sets POSTGRES_USER}"
: "${POSTGRES_DB:?the postgres image sets POSTGRES_DB}"
: "${SCORELOOP_DB_USER:=scoreloop}"
: "${SCORELOOP_DB_PASSWORD:?set SCORELOOP_DB_PASSWORD in .env}"
: "${SCORELOOP_READONLY_USER:=scoreloop_ro}"
: "${SCORELOOP_READONLY_PASSWORD:?set SCORELOOP_READONLY_PASSWORD in .env}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v owner="$SCORELOOP_DB_USER" -v owner_password="$SCORELOOP_DB_PASSWORD" \
  -v ro_user="$SCORELOOP_READONLY_USER" -v ro_password="$SCORELOOP_READONLY_PASSWORD" \
  -v db="$POSTGRES_DB" <<'SQL'
SELECT format('CREATE ROLE %I', :'owner')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'owner') \gexec
SELECT format('CREATE ROLE %I', :'ro_user')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'ro_user') \gexec
ALTER ROLE :"owner" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'owner_password';
ALTER ROLE :"ro_user" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'ro_password';
-- The grants below are what keeps the reader from writing; read-only transactions are a
-- second fence on top (tests/test_compose.py proves the grants alone, with it switched off).
ALTER ROLE :"ro_user" SET default_transaction_read_only = on;
-- A slow exploratory query must not hold locks the daemon needs for long.
ALTER ROLE :"ro_user" SET statement_timeout = '5min';

REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"db" TO :"owner";
GRANT CONNECT ON DATABASE :"db" TO :"ro_user";

-- The daemon's migrations (`scoreloop init`, run on start) create every table and view as owner.
ALTER SCHEMA public OWNER TO :"owner";
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"ro_user";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"ro_user";
GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO :"ro_user";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO :"ro_user";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON SEQUENCES TO :"ro_user";
SQL
