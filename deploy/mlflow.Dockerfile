# The team's MLflow server (deploy/compose.yaml): MLflow with its basic-auth app (Flask-WTF) and PostgreSQL's driver
# (psycopg 3), at the versions of constraints.txt; a non-root user; the artifacts it serves in /artifacts (a volume).
#   docker build -f deploy/mlflow.Dockerfile -t digit-mlflow-server .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
# A virtual environment: the base image's Python may be the system's (Debian's is externally managed, PEP 668).
RUN python -m venv /opt/venv
COPY constraints.txt /tmp/constraints.txt
RUN python -m pip install --quiet -c /tmp/constraints.txt 'mlflow[auth]' 'psycopg[binary]' && rm /tmp/constraints.txt
RUN useradd --create-home --uid 1000 mlflow && mkdir /artifacts && chown mlflow:mlflow /artifacts
COPY deploy/basic_auth.ini /etc/mlflow/basic_auth.ini
ENV MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini
USER mlflow
VOLUME ["/artifacts"]
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--help"]
