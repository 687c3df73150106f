#!/bin/bash
# Runs once, when the postgres container creates its data volume (docker-entrypoint-initdb.d).
# Creates a login role that can read every table and view of the scoreloop database, now and in
# the future (default privileges of the owner role that `scoreloop init` runs migrations as),
# and nothing else: for people who inspect traces with psql.
set -euo pipefail

: "${SCORELOOP_READONLY_USER:=scoreloop_ro}"
: "${SCORELOOP_READONLY_PASSWORD:?set SCORELOOP_READONLY_PASSWORD in .env}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v ro_user="$SCORELOOP_READONLY_USER" -v ro_password="$SCORELOOP_READONLY_PASSWORD" \
  -v owner="$POSTGRES_USER" -v db="$POSTGRES_DB" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'ro_user', :'ro_password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'ro_user') \gexec
ALTER ROLE :"ro_user" SET default_transaction_read_only = on;
-- A slow exploratory query must not hold locks the daemon needs for long.
ALTER ROLE :"ro_user" SET statement_timeout = '5min';
GRANT CONNECT ON DATABASE :"db" TO :"ro_user";
GRANT USAGE ON SCHEMA public TO :"ro_user";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"ro_user";
GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO :"ro_user";
-- Tables and views that migrations create later (run as the owner) are readable too.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO :"ro_user";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON SEQUENCES TO :"ro_user";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
