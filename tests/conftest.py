"Shared fixtures: the project root, the canonical MNIST folder, and a runner for the console scripts."
import os, subprocess, sys
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


def run_command(cmd, *args, env=None, timeout=900, check=None):
    "Run console script `cmd` from the project root with extra environment (None removes a variable)."
    e = {k: v for k, v in os.environ.items() if k != 'MLFLOW_REGISTRY_URI'}   # set by mlflow.set_registry_uri in-process
    e.update(env or {})
    for k, v in (env or {}).items():
        if v is None: e.pop(k)
    r = subprocess.run([str(BIN/cmd), *map(str, args)], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check is not None: assert r.returncode == check, f"{cmd} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope='session')
def run_cli():
    "Run a console script from the project root; returns the CompletedProcess."
    return run_command


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
    import secrets, time, urllib.request
    d = tmp_path_factory.mktemp('mlflow-server')
    port, password = free_port(), secrets.token_urlsafe(16)
    env = {**os.environ, 'MLFLOW_AUTH_ADMIN_PASSWORD': password, 'MLFLOW_FLASK_SERVER_SECRET_KEY': secrets.token_hex(16)}
    for k in ('MLFLOW_TRACKING_URI', 'MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD'): env.pop(k, None)
    log = open(d/'server.log', 'w')
    proc = subprocess.Popen([str(BIN/'mlflow'), 'server', '--app-name', 'basic-auth', '--host', '127.0.0.1', '--port', str(port),
                             '--backend-store-uri', f"sqlite:///{d/'mlflow.db'}", '--artifacts-destination', str(d/'artifacts'),
                             '--workers', '2'], cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(f"{uri}/health", proc, d/'server.log')
    server = Server((uri, 'admin', password)); server.dir = d
    yield server
    proc.terminate()
    try: proc.wait(20)
    except subprocess.TimeoutExpired: proc.kill()
