# PostgreSQL from Debian's package, for hosts that reach a Debian mirror but no image registry (deploy/compose.yaml
# uses the official postgres image otherwise). It does what the compose file asks of the official image, no more:
# POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB, the *.sql files of /docker-entrypoint-initdb.d run once on an
# empty data volume, pg_isready, the server as the `postgres` user on port 5432 with password (scram-sha-256) logins.
#   docker build --network host -f deploy/postgres.Dockerfile --build-arg BASE_IMAGE=digit-base:bookworm \
#       -t digit-postgres .
#   POSTGRES_IMAGE=digit-postgres in deploy/.env
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# Debian's package makes a cluster of its own when installed: not here, the entrypoint makes one in the volume.
RUN mkdir -p /etc/postgresql-common && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf \
    && apt-get update -q && apt-get install -y -q --no-install-recommends postgresql >/dev/null \
    && rm -rf /var/lib/apt/lists/* && ln -s /usr/lib/postgresql/*/bin /usr/lib/postgresql/bin
ENV PATH=/usr/lib/postgresql/bin:$PATH PGDATA=/var/lib/postgresql/data LANG=C.UTF-8
COPY --chmod=755 deploy/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
ENTRYPOINT ["postgres-entrypoint"]
