#!/bin/sh
# deploy/postgres.Dockerfile's entrypoint: on an empty data volume, make the cluster (POSTGRES_USER with
# POSTGRES_PASSWORD, POSTGRES_DB) and run /docker-entrypoint-initdb.d/*.sql once; then run the server as `postgres`.
set -eu
: "${POSTGRES_PASSWORD:?error: POSTGRES_PASSWORD is not set (deploy/.env)}"
USER_NAME=${POSTGRES_USER:-postgres}
DB=${POSTGRES_DB:-$USER_NAME}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }
mkdir -p "$PGDATA" /run/postgresql
chown postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pw=$(mktemp)                                              # the password reaches initdb in a file, not argv
  printf '%s' "$POSTGRES_PASSWORD" > "$pw"; chown postgres "$pw"
  as_postgres initdb -D "$PGDATA" -U "$USER_NAME" --pwfile="$pw" --auth-local=trust --auth-host=scram-sha-256 \
    >/dev/null
  rm -f "$pw"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"          # other containers, other machines
  as_postgres pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null    # the socket only
  [ "$DB" = postgres ] || as_postgres psql -q -v ON_ERROR_STOP=1 -U "$USER_NAME" -d postgres \
    -c "CREATE DATABASE \"$DB\"" >/dev/null
  for f in /docker-entrypoint-initdb.d/*.sql; do
    [ -e "$f" ] && as_postgres psql -q -v ON_ERROR_STOP=1 -U "$USER_NAME" -d "$DB" -f "$f" >/dev/null
  done
  as_postgres pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "postgres: cluster made for $USER_NAME, database $DB"
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups -- postgres -D "$PGDATA" -c listen_addresses='*'
