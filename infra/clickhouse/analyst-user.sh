#!/bin/bash
# Run once by the clickhouse-server image at its first start (docker-entrypoint-initdb.d):
# a read-only analyst login. The readonly settings profile makes the server refuse every
# write, DDL and settings change for this user; SELECT is granted on the aipipe database.
set -euo pipefail
clickhouse client --user "${CLICKHOUSE_USER:-default}" --password "${CLICKHOUSE_PASSWORD:-}" \
  --multiquery <<SQL
CREATE DATABASE IF NOT EXISTS aipipe;
CREATE SETTINGS PROFILE IF NOT EXISTS analyst_readonly SETTINGS readonly = 1;
CREATE USER IF NOT EXISTS analyst IDENTIFIED BY '${ANALYST_PASSWORD:-analyst}'
  SETTINGS PROFILE 'analyst_readonly';
GRANT SELECT ON aipipe.* TO analyst;
SQL
