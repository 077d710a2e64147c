"""Shared fixtures: the project root, the canonical MNIST folder, a runner for the console scripts, and what is
expensive enough to make once per session: the cleaned dataset, one MLflow server with login, one tiny run trained on
it, and one small checkpoint. Tests that run papermill kernels, servers or builds carry `@pytest.mark.slow`."""
import os, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope='session')
def mnist_dir():
    "A folder holding the four MNIST files: MNIST_DIR (tests and CI), else the project's verified copy."
    if os.environ.get('MNIST_DIR'): return Path(os.environ['MNIST_DIR'])
    from digit_recognition.data import fetch_mnist, raw_dir
    from digit_recognition.config import Settings
    fetch_mnist()
    return raw_dir(Settings().path('paths', 'data_dir'))


def run_command(cmd, *args, env=None, timeout=900, check=None, cwd=ROOT):
    "Run console script `cmd` from the project root with extra environment (None removes a variable)."
    # (MLFLOW_REGISTRY_URI is set by mlflow.set_registry_uri in this process: not for the command)
    e = {k: v for k, v in os.environ.items() if k != 'MLFLOW_REGISTRY_URI'}
    e.update(env or {})
    for k, v in (env or {}).items():
        if v is None: e.pop(k)
    r = subprocess.run([str(BIN/cmd), *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert r.returncode == check, f"{cmd} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def as_in_a_terminal():
    """`preexec_fn` for a command that a test will Ctrl-C: SIGINT handled by default and not blocked, as in a terminal's
    foreground job (a test worker's children may inherit SIGINT ignored or blocked, and Python keeps it so)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def sigint_state(pid:int) -> str:
    "The SigBlk / SigIgn lines of process `pid` (Linux), to show in an assertion."
    try: return ' '.join(l.strip() for l in Path(f'/proc/{pid}/status').read_text().splitlines()
                         if l.startswith(('SigBlk', 'SigIgn')))
    except OSError: return ''


def together(*calls):
    """Call each of `calls` (functions of no arguments, each running independent commands) at the same time, and
    return their results in order: most of a command's time is one core importing libraries, so two cores run two
    of them in about the time of one. The first exception raised by a call is raised here."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.result() for f in futures]


# Under pytest-xdist (`make test` runs `-n 3` where it is installed) tests are dealt to the workers in units: a group
# below goes to one worker as a whole, every other test is a unit of its own. A group holds the tests that share what
# is expensive to make once per worker (a module fixture, an MLflow server): split, each worker would make it again.
# The two MLflow-server groups each start one server; the first also trains the tiny run (`server_run`) and holds
# every test that reads it.
GROUPS = {'mlflow-server-a': ('tests/test_training_mlflow.py::test_run_is_recorded',
                              'tests/test_training_mlflow.py::test_logged_model_predicts',
                              'tests/test_training_mlflow.py::test_executed_notebook_and_no_secrets',
                              'tests/test_training_mlflow.py::test_wrong_password_fails_fast_and_keeps_checkpoint',
                              'tests/test_evaluation.py::test_registry_on_the_login_server',
                              'tests/test_client_venv.py::'),                    # and its venv (client_venv)
          'mlflow-server-b': ('tests/test_secrets.py::',
                              'tests/test_training_mlflow.py::test_killed_run_keeps_checkpoint_and_resumes'),
          'sqlite-sweep': ('tests/test_training_mlflow.py::test_sweep_',),           # one digit-sweep --jobs 3
          'wheel': ('tests/test_wheel.py::',),                                          # the built wheel (installed)
          'evaluation-local': ('tests/test_evaluation.py::test_registry_decisions',     # the three tiny models (local)
                               'tests/test_evaluation.py::test_no_register_and_bad_model'),
          'model-store': ('tests/test_model_safety.py::test_registered_model_is_weights_only',   # store
                          'tests/test_model_safety.py::test_models_registered_before_the_change'),
          'interrupted-run': ('tests/test_reliability.py::test_ctrl_c_is_one_line',     # interrupted
                              'tests/test_reliability.py::test_resume_says_what_it_took_the_argument_for'),
          'digit-serve': ('tests/test_serve.py::',),                                   # one digit-serve
          'served-model': ('tests/test_client.py::test_predict_through_a_served_model',  # served
                           'tests/test_client.py::test_served_model_checks_its_input'),
          'postgres': ('tests/test_team.py::test_two_workers_and_a_killed_one',)}     # PostgreSQL, its MLflow server
SERVER_RUN_GROUP = 'mlflow-server-a'
# The units that take longest (wall time under `make test`), longest first: they start first, so that none of them
# is left running alone at the end. After them come the other tests marked slow, then the rest.
LONGEST = ('mlflow-server-b', 'mlflow-server-a', 'postgres', 'tests/test_deployment.py::test_deployment_commands',
           'tests/test_ddp.py::test_killed_worker_ends_the_run_and_resume_finishes_it',
           'evaluation-local', 'tests/test_evaluation.py::test_pipeline_reuses_current_stages', 'wheel', 'model-store',
           'tests/test_client.py::test_each_kind_of_file')


def group_of(nodeid):
    "The group of test `nodeid`, or None."
    return next((g for g, ps in GROUPS.items() if nodeid.startswith(ps)), None)


def pytest_collection_modifyitems(config, items):
    """Keep GROUPS honest: under xdist a test that uses the server outside a server group would start one more server,
    and one that reads `server_run` outside its group would train it again. Under xdist, slow tests come first."""
    uses = lambda i, f: f in getattr(i, 'fixturenames', ())
    stray = [i.nodeid for i in items if uses(i, 'mlflow_server') and not (group_of(i.nodeid) or '').startswith(
             'mlflow-server') or uses(i, 'server_run') and group_of(i.nodeid) != SERVER_RUN_GROUP]
    if stray: raise pytest.UsageError(f"tests/conftest.py: put these tests in the right group of GROUPS: {stray}")
    if hasattr(config, 'workerinput'): items.sort(key=lambda i: i.get_closest_marker('slow') is None)   # stable


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist: each group on one worker; the LONGEST units first, then the others in collection order (slow tests
    first); a worker gets its next unit only when it is down to its last test (the least a worker needs to go on), so
    that the units left go to whichever worker is free first."""
    from xdist.scheduler import LoadScopeScheduling
    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid): return group_of(nodeid) or nodeid
        def _assign_work_unit(self, node):
            first = {u: i for i, u in enumerate(dict.fromkeys(map(self._split_scope, self.collection)))}
            rank = lambda u: (LONGEST.index(u) if u in LONGEST else len(LONGEST), first[u])
            self.workqueue.move_to_end(min(self.workqueue, key=rank), last=False)     # the unit xdist then pops
            super()._assign_work_unit(node)
        def _reschedule(self, node):                                                # xdist's, but `<= 1` (not 2)
            if node.shutting_down: return
            if not self.workqueue: node.shutdown(); return
            if self._pending_of(self.assigned_work[node]) <= 1: self._assign_work_unit(node)
    return Scheduling(config, log)


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


def wait_for_http(url, proc, log, seconds=180):
    "Wait until `url` answers 200, failing with the end of `log` if `proc` exits or time runs out."
    import time, urllib.request
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill(); raise RuntimeError(f"{url} did not answer:\n{Path(log).read_text()[-3000:]}")
        time.sleep(0.5)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


class Server(tuple):
    "`(uri, user, password)` of a running server; `.dir` is its folder (backend store, artifacts, log)."


@pytest.fixture(scope='session')
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server with basic-auth login on 127.0.0.1, as DagsHub has; yields (uri, user, password).
    Its login config is MLflow's own with the credential cache on (`auth_cache_ttl_seconds`): a password that passed is
    not hashed again on every request (scrypt, about 0.1 s of CPU each: minutes over the session); a wrong one still is.
    """
    import configparser, importlib.util, secrets
    d = tmp_path_factory.mktemp('mlflow-server')
    port, password = free_port(), secrets.token_urlsafe(16)
    auth = configparser.ConfigParser()
    auth.read(Path(importlib.util.find_spec('mlflow').origin).parent/'server'/'auth'/'basic_auth.ini')
    auth['mlflow']['auth_cache_ttl_seconds'] = '3600'
    with open(d/'basic_auth.ini', 'w') as f: auth.write(f)
    env = {**os.environ, 'MLFLOW_AUTH_ADMIN_PASSWORD': password, 'MLFLOW_AUTH_CONFIG_PATH': str(d/'basic_auth.ini'),
           'MLFLOW_FLASK_SERVER_SECRET_KEY': secrets.token_hex(16),
           'MLFLOW_SERVER_ENABLE_JOB_EXECUTION': 'false'}   # no job runner (GenAI jobs): a dozen processes less
    for k in ('MLFLOW_TRACKING_URI', 'MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD'): env.pop(k, None)
    log = open(d/'server.log', 'w')      # one worker process: its threads serve the commands' requests at once
    proc = subprocess.Popen([str(BIN/'mlflow'), 'server', '--app-name', 'basic-auth', '--host', '127.0.0.1',
                             '--port', str(port), '--backend-store-uri', f"sqlite:///{d/'mlflow.db'}",
                             '--artifacts-destination', str(d/'artifacts'), '--workers', '1'],
                            cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(f"{uri}/health", proc, d/'server.log')
    server = Server((uri, 'admin', password)); server.dir = d
    yield server
    proc.terminate()
    try: proc.wait(20)
    except subprocess.TimeoutExpired: proc.kill()


def server_env(server, results, password=None):
    "The environment that points the commands at `server` (with its login, or `password`) and results at `results`."
    uri, user, pw = server
    return {'MLFLOW_TRACKING_URI': uri, 'MLFLOW_TRACKING_USERNAME': user, 'MLFLOW_TRACKING_PASSWORD': password or pw,
            'DIGIT_PATHS_RESULTS_DIR': str(results)}


class Postgres(tuple):
    "`(host, port, user, password)` of a running PostgreSQL; `.url(db)` an SQLAlchemy URL, `.dir` its folder."
    def url(self, db, password=True, scheme='postgresql+psycopg'):
        host, port, user, pw = self
        return f"{scheme}://{user}{':' + pw if password else ''}@{host}:{port}/{db}"


def postgres_bin():
    "The folder of PostgreSQL's server programs (Debian's /usr/lib/postgresql/N/bin, the newest), or None."
    import glob, shutil
    found = sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'), key=lambda p: int(Path(p).parts[-3]))
    if found: return Path(found[-1]).parent
    return Path(shutil.which('initdb')).parent if shutil.which('initdb') and shutil.which('pg_ctl') else None


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
    import configparser, importlib.util, secrets
    d = tmp_path_factory.mktemp('mlflow-pg-server')
    port, password = free_port(), secrets.token_urlsafe(16)
    auth = configparser.ConfigParser()
    auth.read(Path(importlib.util.find_spec('mlflow').origin).parent/'server'/'auth'/'basic_auth.ini')
    auth['mlflow']['database_uri'] = postgres.url('mlflow_auth', password=False)
    auth['mlflow']['auth_cache_ttl_seconds'] = '3600'
    with open(d/'basic_auth.ini', 'w') as f: auth.write(f)
    env = {**os.environ, 'MLFLOW_AUTH_ADMIN_PASSWORD': password, 'MLFLOW_AUTH_CONFIG_PATH': str(d/'basic_auth.ini'),
           'MLFLOW_FLASK_SERVER_SECRET_KEY': secrets.token_hex(16), 'PGPASSWORD': postgres[3],
           'MLFLOW_BACKEND_STORE_URI': postgres.url('mlflow', password=False),
           'MLFLOW_SERVER_ENABLE_JOB_EXECUTION': 'false'}
    for k in ('MLFLOW_TRACKING_URI', 'MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD'): env.pop(k, None)
    log = open(d/'server.log', 'w')
    proc = subprocess.Popen([str(BIN/'mlflow'), 'server', '--app-name', 'basic-auth', '--host', '127.0.0.1',
                             '--port', str(port), '--artifacts-destination', str(d/'artifacts'), '--workers', '1'],
                            cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(f"{uri}/health", proc, d/'server.log')
    server = Server((uri, 'admin', password)); server.dir = d
    yield server
    proc.terminate()
    try: proc.wait(20)
    except subprocess.TimeoutExpired: proc.kill()

# The session's tiny training run on the login server (seconds of training; a papermill kernel and MLflow around it).
TINY_RUN = ['--epochs', '2', '--max-train-samples', '1000', '--batch-size', '100']


class ServerRun(tuple):
    "`(run_id, results, completed_process)` of `digit-train` on the server."


@pytest.fixture(scope='session')
def server_run(tmp_path_factory, mlflow_server, run_cli, data_ready):
    """One tiny `digit-train` run (TINY_RUN, run name 'tiny') on the login server, shared by the session: what it
    recorded (test_training_mlflow) and its evaluation and registration there (test_evaluation)."""
    import re
    results = tmp_path_factory.mktemp('server-results')
    r = run_cli('digit-train', *TINY_RUN, '--run-name', 'tiny', env=server_env(mlflow_server, results), check=0)
    rid = re.search(r'^run ([0-9a-f]{32}):', r.stdout, re.M).group(1)
    return ServerRun((rid, results, r))


def shared_dir(tmp_path_factory, name):
    "A folder shared by this session's xdist workers (each worker has its own basetemp below the session's)."
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base)/name


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
        if not (d/'digit.png').is_file(): _train_checkpoint(d)
    return d


def _train_checkpoint(d):
    import numpy as np, torch
    from PIL import Image
    from digit_recognition.data import load_cleaned
    from digit_recognition.model import get_model
    from digit_recognition.training import fit, TrainParams
    from digit_recognition.calibration import finish_checkpoint
    p = TrainParams(epochs=3, seed=42, device='cpu', max_train_samples=30000, patience=0)    # the recipe, shorter
    torch.manual_seed(42)
    data = load_cleaned(splits=('train', 'val'))
    fit(get_model('cnn'), data, d, p)
    finish_checkpoint(d, data, p)                                                   # as a training run does
    x = load_cleaned(splits=('test',)).test[0]
    np.save(d/'images.npy', x[:64].squeeze(1).numpy())
    Image.fromarray(x[0, 0].numpy()).save(d/'digit.png')
