"""Plain helpers of the tests (no fixtures: those are in conftest.py): where the project and its commands are, running
a console script, waiting for a server, free ports, the environment that points a command at a tracking server, and
the one way the suite starts an MLflow server with login (on SQLite or on PostgreSQL)."""
import contextlib, os, shutil, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# The session's tiny training run on the login server (seconds of training; a papermill kernel and MLflow around it).
# No ink changes: 2 epochs on 1,000 images with them leave too weak a model to answer some images "not sure".
TINY_RUN = ['--epochs', '2', '--max-train-samples', '1000', '--batch-size', '100', '--ink', '0', '--width', '16',
            '--no-tta']


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

@contextlib.contextmanager
def refused_port():
    """A loopback port that refuses connections while the block runs: held bound, never listening, so that no other
    worker's server can take it (a port `free_port` gave back can be taken before the command connects)."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        yield s.getsockname()[1]

class Server(tuple):
    "`(uri, user, password)` of a running server; `.dir` is its folder (backend store, artifacts, log)."


def start_mlflow_server(d:Path, env:dict, store:list):
    """An MLflow server with basic-auth login in folder `d` on a free loopback port, with `env` added to its
    environment and `store` its store arguments (`--backend-store-uri ...`, or none when `env` names the store). Its
    login config is MLflow's own with the credential cache on (`auth_cache_ttl_seconds`): a password that passed is not
    hashed again on every request (scrypt, about 0.1 s of CPU each: minutes over the session); a wrong one still is.
    Returns `(server, process)`; `server` is `(uri, user, password)` with `.dir`."""
    import configparser, importlib.util, secrets
    port, password = free_port(), secrets.token_urlsafe(16)
    auth = configparser.ConfigParser()
    auth.read(Path(importlib.util.find_spec('mlflow').origin).parent/'server'/'auth'/'basic_auth.ini')
    auth['mlflow']['auth_cache_ttl_seconds'] = '3600'
    auth['mlflow'].update(env.pop('AUTH', {}))
    with open(d/'basic_auth.ini', 'w') as f: auth.write(f)
    e = {**os.environ, 'MLFLOW_AUTH_ADMIN_PASSWORD': password, 'MLFLOW_AUTH_CONFIG_PATH': str(d/'basic_auth.ini'),
         'MLFLOW_FLASK_SERVER_SECRET_KEY': secrets.token_hex(16),
         'MLFLOW_SERVER_ENABLE_JOB_EXECUTION': 'false', **env}   # no job runner (GenAI jobs): a dozen processes less
    for k in ('MLFLOW_TRACKING_URI', 'MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD'): e.pop(k, None)
    log = open(d/'server.log', 'w')      # one worker process: its threads serve the commands' requests at once
    proc = subprocess.Popen([str(BIN/'mlflow'), 'server', '--app-name', 'basic-auth', '--host', '127.0.0.1',
                             '--port', str(port), *store, '--artifacts-destination', str(d/'artifacts'),
                             '--workers', '1'], cwd=d, env=e, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(f"{uri}/health", proc, d/'server.log')
    server = Server((uri, 'admin', password)); server.dir = d
    return server, proc


def stop(proc):
    "Terminate `proc`, killing it when it does not end within 20 s."
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

class ServerRun(tuple):
    "`(run_id, results, completed_process)` of `digit-train` on the server."

def shared_dir(tmp_path_factory, name):
    "A folder shared by this session's xdist workers (each worker has its own basetemp below the session's)."
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base)/name


def train_checkpoint(d):
    "Train the session's small checkpoint into `d` (see the `checkpoint_dir` fixture)."
    import numpy as np, torch
    from PIL import Image
    from digit_recognition.data import load_cleaned
    from digit_recognition.model import get_model
    from digit_recognition.training import fit, TrainParams
    from digit_recognition.calibration import finish_checkpoint
    p = TrainParams(epochs=3, seed=42, device='cpu', max_train_samples=30000, patience=0,   # the recipe, shorter
                    width=16)                                                    # and narrower
    torch.set_num_threads(2)    # the same checkpoint on every machine and under `make test`'s OMP_NUM_THREADS=1:
    torch.manual_seed(42)       # floating-point sums, and so the weights, depend on the number of threads
    data = load_cleaned(splits=('train', 'val'))
    fit(get_model('cnn', width=p.width), data, d, p)
    finish_checkpoint(d, data, p)                                                   # as a training run does
    x = load_cleaned(splits=('test',)).test[0]
    np.save(d/'images.npy', x[:64].squeeze(1).numpy())
    Image.fromarray(x[0, 0].numpy()).save(d/'digit.png')


def compose_command() -> list|None:
    "Docker Compose: the docker CLI's plugin (`docker compose`), else Debian's docker-compose (1.29); None if neither."
    docker = shutil.which('docker')
    if docker and subprocess.run([docker, 'compose', 'version'], capture_output=True).returncode == 0:
        return [docker, 'compose']
    return [shutil.which('docker-compose')] if shutil.which('docker-compose') else None
