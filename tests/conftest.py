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


# The tests that use the session's MLflow server (`mlflow_server`, `server_run`), in two groups. Under pytest-xdist
# (`make test` runs `-n 3` where it is installed) each group goes to one worker, which starts one server for it; the
# first group also trains the tiny run (`server_run`) once and shares it.
SERVER_GROUPS = {'mlflow-server-b': ('tests/test_secrets.py::',
                                     'tests/test_training_mlflow.py::test_killed_run_keeps_checkpoint_and_resumes'),
                 'mlflow-server-a': ('tests/test_training_mlflow.py::',
                                     'tests/test_evaluation.py::test_registry_on_the_login_server',
                                     'tests/test_client_venv.py::test_digit_predict_reads_a_model_logged_on_the_server')}


def server_group(nodeid):
    "The server group of test `nodeid`, or None."
    return next((g for g, ps in SERVER_GROUPS.items() if nodeid.startswith(ps)), None)


def pytest_collection_modifyitems(config, items):
    "Keep SERVER_GROUPS honest: a test that uses the server elsewhere would start one more under xdist."
    stray = [i.nodeid for i in items
             if 'mlflow_server' in getattr(i, 'fixturenames', ()) and not server_group(i.nodeid)]
    if stray: raise pytest.UsageError(f"tests/conftest.py: add these tests to SERVER_GROUPS: {stray}")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    "pytest-xdist: each server group on one worker, in order; every other test to whichever worker is free."
    from xdist.scheduler import LoadScopeScheduling
    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid): return server_group(nodeid) or nodeid
    return Scheduling(config, log)


@pytest.fixture(scope='session')
def run_cli():
    "Run a console script from the project root; returns the CompletedProcess."
    return run_command


@pytest.fixture(scope='session')
def data_ready(run_cli):
    "The project's dataset_cleaned/, built by `digit-data` (once per session; reused when current)."
    run_cli('digit-data', check=0)


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
    "A real MLflow tracking server with basic-auth login on 127.0.0.1, as DagsHub has; yields (uri, user, password)."
    import secrets
    d = tmp_path_factory.mktemp('mlflow-server')
    port, password = free_port(), secrets.token_urlsafe(16)
    env = {**os.environ, 'MLFLOW_AUTH_ADMIN_PASSWORD': password,
           'MLFLOW_FLASK_SERVER_SECRET_KEY': secrets.token_hex(16)}
    for k in ('MLFLOW_TRACKING_URI', 'MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD'): env.pop(k, None)
    log = open(d/'server.log', 'w')
    proc = subprocess.Popen([str(BIN/'mlflow'), 'server', '--app-name', 'basic-auth', '--host', '127.0.0.1',
                             '--port', str(port), '--backend-store-uri', f"sqlite:///{d/'mlflow.db'}",
                             '--artifacts-destination', str(d/'artifacts'), '--workers', '2'],
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
    """A checkpoint good enough to read digits, trained once per session (`fit`, one epoch on 10,000 images: seconds;
    the first xdist worker to need it trains it, the others wait and share it); beside it 64 test images (images.npy)
    and one as a file (digit.png), and the network as ONNX (model.onnx). Read it, don't change it."""
    from filelock import FileLock
    d = shared_dir(tmp_path_factory, 'checkpoint')
    with FileLock(f"{d}.lock"):
        if not (d/'digit.png').is_file(): _train_checkpoint(d)
    return d


def _train_checkpoint(d):
    import numpy as np, torch
    from PIL import Image
    from digit_recognition.data import load_cleaned
    from digit_recognition.model import get_model, export_onnx
    from digit_recognition.training import fit, TrainParams, Probabilities, model_from_checkpoint
    p = TrainParams(epochs=1, lr=0.01, augment=False, seed=42, device='cpu', max_train_samples=10000, patience=0)
    torch.manual_seed(42)
    fit(get_model('cnn'), load_cleaned(splits=('train', 'val')), d, p)
    export_onnx(Probabilities(model_from_checkpoint(d/'best.pt')), d/'model.onnx')   # what a training run writes too
    x = load_cleaned(splits=('test',)).test[0]
    np.save(d/'images.npy', x[:64].squeeze(1).numpy())
    Image.fromarray(x[0, 0].numpy()).save(d/'digit.png')
