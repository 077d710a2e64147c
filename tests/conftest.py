"""Fixtures only (plain helpers are in helpers.py, the workers' grouping in xdist_groups.py): the canonical MNIST
folder, a runner for the console scripts, and what is expensive enough to make once per session: the cleaned
dataset, one MLflow server with login (and a team's, on PostgreSQL), one tiny run trained on it, and one small
checkpoint. Tests that run papermill kernels, servers or builds carry `@pytest.mark.slow`."""
import os, subprocess
from pathlib import Path
import pytest
from helpers import (TINY_RUN, run_command, start_mlflow_server, stop, Postgres, postgres_bin, ServerRun,
                     server_env, shared_dir, train_checkpoint, free_port)
from xdist_groups import pytest_collection_modifyitems, pytest_xdist_make_scheduler   # noqa: F401 (hooks)


@pytest.fixture(scope='session')
def mnist_dir():
    "A folder holding the four MNIST files: MNIST_DIR (tests and CI), else the project's verified copy."
    if os.environ.get('MNIST_DIR'): return Path(os.environ['MNIST_DIR'])
    from digit_recognition.mnist import fetch_mnist, raw_dir
    from digit_recognition.config import Settings
    fetch_mnist()
    return raw_dir(Settings().path('paths', 'data_dir'))

@pytest.fixture(scope='session')
def run_cli():
    "Run a console script from the project root; returns the CompletedProcess."
    return run_command

@pytest.fixture(scope='session')
def data_ready(tmp_path_factory, run_cli):
    "The project's dataset_cleaned/, built by `digit-data` (reused when current) once per session, by the first worker."
    from filelock import FileLock
    done = shared_dir(tmp_path_factory, 'data-ready')
    with FileLock(f"{done}.lock"):
        if not done.exists(): run_cli('digit-data', check=0); done.touch()

@pytest.fixture(scope='session')
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server with basic-auth login on 127.0.0.1, as DagsHub has, its runs in SQLite; yields
    (uri, user, password)."""
    d = tmp_path_factory.mktemp('mlflow-server')
    server, proc = start_mlflow_server(d, {}, ['--backend-store-uri', f"sqlite:///{d/'mlflow.db'}"])
    yield server
    stop(proc)

@pytest.fixture(scope='session')
def postgres():
    """A PostgreSQL cluster of its own in a temporary folder, on a free loopback port (TCP on 127.0.0.1 only, its
    socket in that folder), with password login (scram-sha-256) for one role, `digit`, and three databases: mlflow
    (MLflow's backend store), mlflow_auth (its basic-auth users) and optuna (the studies). Fast and unsafe settings
    (no fsync): a test's throwaway database. Skipped, with the reason, where PostgreSQL's server programs are missing
    (Debian: `apt-get install postgresql`). Run as root, the cluster belongs to the `postgres` user (initdb refuses
    root). Stopped and removed at the end of the session."""
    import pwd, secrets, shutil, tempfile, psycopg
    bindir = postgres_bin()
    if bindir is None: pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed: "
                                   "apt-get install postgresql")
    as_user = {}
    if os.geteuid() == 0:
        try: pw_ent = pwd.getpwnam('postgres')
        except KeyError: pytest.skip("running as root and there is no 'postgres' user to own the cluster (initdb "
                                     "refuses root): apt-get install postgresql creates it")
        as_user = {'user': pw_ent.pw_uid, 'group': pw_ent.pw_gid, 'extra_groups': []}
    d = Path(tempfile.mkdtemp(prefix='digit-pg-'))
    port, password = free_port(), secrets.token_urlsafe(16)
    (d/'pw').write_text(password + '\n'); (d/'pw').chmod(0o600)
    if as_user:
        for p in (d, d/'pw'): os.chown(p, as_user['user'], as_user['group'])
    env = {'PATH': f"{bindir}:/usr/bin:/bin", 'LANG': 'C.UTF-8', 'LC_ALL': 'C.UTF-8', 'HOME': str(d)}
    run = lambda *cmd: subprocess.run([str(bindir/cmd[0]), *cmd[1:]], cwd=d, env=env, capture_output=True,
                                      text=True, timeout=120, **as_user)
    r = run('initdb', '-D', str(d/'data'), '-U', 'digit', '--pwfile', str(d/'pw'), '-A', 'scram-sha-256',
            '-E', 'UTF8', '--no-instructions')
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (d/'pw').unlink()
    opts = f"-p {port} -k {d} -h 127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    r = run('pg_ctl', '-D', str(d/'data'), '-l', str(d/'server.log'), '-o', opts, '-w', '-t', '60', 'start')
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + (d/'server.log').read_text()[-2000:]
    pg = Postgres(('127.0.0.1', port, 'digit', password)); pg.dir = d
    try:
        with psycopg.connect(host='127.0.0.1', port=port, user='digit', password=password, dbname='postgres',
                             autocommit=True) as c:
            for db in ('mlflow', 'mlflow_auth', 'optuna'): c.execute(f"CREATE DATABASE {db}")
        yield pg
    finally:
        run('pg_ctl', '-D', str(d/'data'), '-m', 'immediate', '-w', 'stop')
        shutil.rmtree(d, ignore_errors=True)

@pytest.fixture(scope='session')
def mlflow_pg_server(tmp_path_factory, postgres):
    """A team's MLflow server: basic-auth login, runs in PostgreSQL (`--backend-store-uri postgresql+psycopg://...`),
    its users in PostgreSQL too (`database_uri` of the auth config), artifacts served by the server itself
    (`--artifacts-destination`, a folder here). The database password reaches it as PGPASSWORD (libpq's), so that no
    URL, command line or config file holds it; yields (uri, user, password) like `mlflow_server`."""
    d = tmp_path_factory.mktemp('mlflow-pg-server')
    server, proc = start_mlflow_server(d, {'PGPASSWORD': postgres[3], 'AUTH': {'database_uri': postgres.url(
        'mlflow_auth', password=False)}, 'MLFLOW_BACKEND_STORE_URI': postgres.url('mlflow', password=False)}, [])
    yield server
    stop(proc)

@pytest.fixture(scope='session')
def server_run(tmp_path_factory, mlflow_server, run_cli, data_ready):
    """One tiny `digit-train` run (TINY_RUN, run name 'tiny') on the login server, shared by the session: what it
    recorded (test_training_mlflow) and its evaluation and registration there (test_evaluation)."""
    import re
    results = tmp_path_factory.mktemp('server-results')
    r = run_cli('digit-train', *TINY_RUN, '--run-name', 'tiny', env=server_env(mlflow_server, results), check=0)
    rid = re.search(r'^run ([0-9a-f]{32}):', r.stdout, re.M).group(1)
    return ServerRun((rid, results, r))

@pytest.fixture(scope='session')
def checkpoint_dir(tmp_path_factory, data_ready):
    """A checkpoint good enough to read digits and to say "not sure" of what is not one, trained once per session as a
    training run trains (`fit` with outlier exposure, three epochs on 30,000 images: seconds; then `finish_checkpoint`:
    calibrated, its threshold fitted, exported to ONNX with both), by the first xdist worker to need it, the
    others waiting to share it; beside it 64 test images (images.npy) and one as a file (digit.png). Read it, don't
    change it."""
    from filelock import FileLock
    d = shared_dir(tmp_path_factory, 'checkpoint')
    with FileLock(f"{d}.lock"):
        if not (d/'digit.png').is_file(): train_checkpoint(d)
    return d
