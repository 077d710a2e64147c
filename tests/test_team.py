"""Several writers at once: `digit-tune` workers of a team sharing one study in PostgreSQL and one MLflow server on
PostgreSQL (one of them killed mid-trial, as a machine dying), parallel first runs on the default SQLite store, and
the docker compose file that describes the team's services (deploy/compose.yaml)."""
import json, os, re, signal, subprocess, sys, time
from pathlib import Path
import pytest
import yaml
from helpers import ROOT, BIN, compose_command

COMPOSE = ROOT/'deploy'/'compose.yaml'


def descendants(pid:int) -> list:
    "`pid` and every process below it (Linux /proc): a papermill kernel runs in a session of its own."
    kids = {}
    for st in Path('/proc').glob('[0-9]*/stat'):
        try: ppid = int(st.read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError): continue
        kids.setdefault(ppid, []).append(int(st.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop(); out.append(p); todo += kids.get(p, [])
    return out


def cmdline(pid:int) -> str:
    try: return Path(f'/proc/{pid}/cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace')
    except OSError: return ''


def kill_machine(proc) -> list:
    "SIGKILL `proc`'s process group and everything below it at once, as a machine dying: the pids killed."
    pids = descendants(proc.pid)
    try: os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError: pass
    for p in pids:
        try: os.kill(p, signal.SIGKILL)
        except ProcessLookupError: pass
    proc.wait(30)
    return pids


@pytest.mark.slow
def test_two_workers_and_a_killed_one(postgres, mlflow_pg_server, data_ready, tmp_path, monkeypatch):
    """Two `digit-tune` workers, as two machines, start one 6-trial study at the same time: the study in PostgreSQL,
    the runs on an MLflow server (basic-auth) on PostgreSQL. One is SIGKILLed with its kernel in the middle of a
    trial and a third takes its place. The study ends with 6 counted trials, each finished trial a child run of the
    one parent; the killed trial is failed and its retry ran; no password leaks."""
    import mlflow, optuna
    uri, user, pw = mlflow_pg_server
    db_pw = postgres[3]
    base = {k: v for k, v in os.environ.items() if not k.startswith(('MLFLOW_', 'DIGIT_', 'PG'))}
    base.update(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=pw,
                DIGIT_TUNE_HEARTBEAT_SECONDS='2', DIGIT_TUNE_GRACE_SECONDS='6')
    if os.environ.get('MNIST_DIR'): base['MNIST_DIR'] = os.environ['MNIST_DIR']
    args = ['--study', 'team', '--trials', '6', '--space', 'lr = float 0.005 0.05 log', '--epochs', '2',
            '--max-train-samples', '500', '--batch-size', '100', '--no-augment', '--width', '16', '--no-tta', '--quiet']
    # Two ways to give the database password: the storage URL with it from the environment (.env), or libpq's
    # PGPASSWORD beside a URL without it.
    ways = [{'DIGIT_TUNE_STORAGE': postgres.url('optuna', scheme='postgresql')},
            {'PGPASSWORD': db_pw, 'ARGS': ['--storage', postgres.url('optuna', password=False, scheme='postgresql')]}]

    def worker(i):
        env = {**base, **ways[i % 2], 'DIGIT_PATHS_RESULTS_DIR': str(tmp_path/f'machine{i}')}
        extra = env.pop('ARGS', [])
        out = open(tmp_path/f'worker{i}.log', 'w')
        return subprocess.Popen([str(BIN/'digit-tune'), *args, *extra, '--sampler-seed', str(i)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    logs = lambda: {i: f.read_text() for i in range(3) if (f := tmp_path/f'worker{i}.log').exists()}
    storage = postgres.url('optuna')
    for k, v in dict(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=pw).items():
        monkeypatch.setenv(k, v)      # this test's client only: the worker's later tests get no login
    client = mlflow.MlflowClient(uri)
    t0 = time.time()
    workers = [worker(0), worker(1)]
    try:
        # Kill worker 1 once its trial's kernel is training: its MLflow child run carries the kernel's pid.
        victim, killed, deadline = workers[1], None, time.time() + 240
        while killed is None:
            assert time.time() < deadline and victim.poll() is None, f"worker 1 never trained:\n{logs()}"
            tree = set(descendants(victim.pid))
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      "tags.`optuna.study` = 'team' and attributes.status = 'RUNNING'")
            mine = [r for r in runs if r.data.tags.get('pid', '').isdigit() and int(r.data.tags['pid']) in tree]
            if mine: killed = (int(mine[0].data.tags['optuna.trial']), mine[0].info.run_id); break
            time.sleep(0.5)
        pids = kill_machine(victim)
        assert int(mine[0].data.tags['pid']) in pids
        t_kill = time.time() - t0
        workers.append(worker(2))                                    # the machine is replaced
        for w in (workers[0], workers[2]): w.wait(max(10, deadline + 120 - time.time()))
    finally:
        for w in workers:
            if w.poll() is None: kill_machine(w)
    out = logs()
    assert workers[0].returncode == 0 and workers[2].returncode == 0, out
    assert workers[1].returncode == -signal.SIGKILL

    st = optuna.load_study(study_name='team', storage=storage)
    ts = st.get_trials()
    numbers = [t.number for t in ts]
    assert len(numbers) == len(set(numbers)), numbers                        # trial numbers unique
    assert all(t.state.is_finished() for t in ts), [(t.number, t.state.name) for t in ts]    # none left running
    k, k_run = killed
    dead = next(t for t in ts if t.number == k)
    assert dead.state == optuna.trial.TrialState.FAIL
    retries = [t for t in ts if t.system_attrs.get('failed_trial') == k]
    assert len(retries) == 1 and retries[0].state.name in ('COMPLETE', 'PRUNED'), [(t.number, t.state) for t in ts]
    assert retries[0].params == dead.params                                 # the retry ran the killed trial's lr
    counted = [t for t in ts if t.number != k]
    assert len(counted) >= 6 and all(t.state.name in ('COMPLETE', 'PRUNED') for t in counted), \
        [(t.number, t.state.name, t.user_attrs.get('error')) for t in ts]

    # MLflow: one parent; every finished trial is its child run (tag optuna.trial), and so is the killed one's
    pid = st.user_attrs['mlflow_parent_run_id']
    exps = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(exps, "tags.`optuna.study` = 'team' and tags.tune = 'parent'")
    assert [p.info.run_id for p in parents] == [pid]
    children = client.search_runs(exps, f"tags.mlflow.parentRunId = '{pid}'")
    by_trial = {int(c.data.tags['optuna.trial']): c for c in children}
    assert len(by_trial) == len(children)                                   # one run per trial, no duplicate
    assert sorted(by_trial) == sorted(numbers), (sorted(by_trial), numbers)  # no lost run, none without a trial
    for t in counted + retries:
        c = by_trial[t.number]
        assert c.info.run_id == t.user_attrs['run_id'] and c.info.status == 'FINISHED'
        assert (c.data.tags.get('pruned') == 'true') == (t.state.name == 'PRUNED')
    assert by_trial[k].info.run_id == k_run and by_trial[k].info.status in ('RUNNING', 'KILLED')

    # no password in the workers' output, nor in any run's parameters and tags
    text = '\n'.join(out.values())
    assert db_pw not in text and pw not in text
    assert 'postgresql+psycopg://***@127.0.0.1' in text or 'postgresql://' not in text
    for r in [*parents, *children]:
        assert db_pw not in json.dumps(r.data.params) + json.dumps(r.data.tags)
    assert re.search(r'^best: trial \d+ \(val_accuracy 0\.\d{4}', out[0] + out[2], re.M), out
    print(f"killed worker 1 at {t_kill:.0f} s (trial {k}); study done at {time.time() - t0:.0f} s; "
          f"{len(ts)} trials: {[(t.number, t.state.name) for t in ts]}")


RACER = """
import sys, time
from pathlib import Path
import mlflow
from digit_recognition.config import Settings
from digit_recognition.data import load_cleaned
from digit_recognition.mlmodel import log_dataset
from digit_recognition.tracking import use_experiment
data, d, i = load_cleaned(splits=('val',)), Path(sys.argv[1]), sys.argv[2]
def step(name):                                            # wait until the test says go
    (d/f'{name}-ready-{i}').touch()
    while not (d/f'{name}-go').exists(): time.sleep(0.001)
step('experiment')
use_experiment('one-dataset', mlflow.get_tracking_uri())
with mlflow.start_run(tags={'racer': i}):
    step('dataset')
    log_dataset(data, Settings().path('paths', 'cleaned_dir'))
"""


@pytest.mark.slow
def test_first_runs_of_a_new_experiment_at_once(mlflow_pg_server, data_ready, tmp_path, monkeypatch):
    """Six processes make the same new experiment at one moment, then log the same dataset into a run of it at one
    moment, as a study's workers do with their first trials: every run is in that experiment and has the dataset.
    (MLflow's `set_experiment` would leave the runs of those whose create lost in 'Default': `use_experiment` creates
    it first. MLflow's store looks for the dataset, then inserts it: the inserts that lose fail on its unique key, and
    `log_dataset` tries them again.)"""
    import mlflow
    uri, user, pw = mlflow_pg_server
    env = {**{k: v for k, v in os.environ.items() if not k.startswith('MLFLOW_')}, 'MLFLOW_TRACKING_URI': uri,
           'MLFLOW_TRACKING_USERNAME': user, 'MLFLOW_TRACKING_PASSWORD': pw}
    n, deadline = 6, time.time() + 240
    procs = [subprocess.Popen([sys.executable, '-c', RACER, tmp_path, str(i)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n)]
    for name in ('experiment', 'dataset'):                      # each step: all at once
        while not all((tmp_path/f'{name}-ready-{i}').exists() for i in range(n)):
            assert time.time() < deadline and all(p.poll() is None for p in procs), [p.poll() for p in procs]
            time.sleep(0.05)
        (tmp_path/f'{name}-go').touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0]*n, [o[-1500:] for o in outs]
    for k, v in dict(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=pw).items():
        monkeypatch.setenv(k, v)      # this test's client only: the worker's later tests get no login
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.racer != ''")
    assert {client.get_experiment(r.info.experiment_id).name for r in runs} == {'one-dataset'}
    assert len(runs) == n and all(len(r.inputs.dataset_inputs) == 1 for r in runs)


@pytest.mark.slow
def test_parallel_first_runs_on_a_fresh_sqlite_store(tmp_path):
    """Four processes start at the same moment on a SQLite store that does not exist yet and each log three runs.
    MLflow creates a store's tables (dozens of migrations) in any process that finds them missing: without the
    project's file lock around that (`tracking._init_store`) three of the four fail on the half-made schema
    ('duplicate column name', 'table ... already exists'). Then the runs' writes take turns: MLflow's SQLite sessions
    wait up to 20 s for the database's lock (`PRAGMA busy_timeout`), so none fails with 'database is locked'."""
    import mlflow
    code = """if True:
        import sys, mlflow
        from digit_recognition.tracking import connect_tracking, use_experiment
        use_experiment('parallel', connect_tracking())
        for i in range(3):
            with mlflow.start_run(run_name=f"{sys.argv[1]}-{i}"):
                mlflow.log_params({f"p{j}": j for j in range(10)})
                for step in range(10): mlflow.log_metrics({'a': step, 'b': 2*step}, step=step)
                mlflow.set_tags({'worker': sys.argv[1]})
    """
    uri = f"sqlite:///{tmp_path/'store'/'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith('MLFLOW_')}
    env.update(MLFLOW_TRACKING_URI=uri, DIGIT_PATHS_RESULTS_DIR=str(tmp_path/'results'))
    procs = [subprocess.Popen([sys.executable, '-c', code, f"w{i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0]*4, '\n'.join(o[-2000:] for o in outs)
    assert not any(w in o for o in outs for w in ('locked', 'already exists', 'duplicate column')), outs
    c = mlflow.MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name('parallel').experiment_id], max_results=100)
    assert sorted(r.info.run_name for r in runs) == sorted(f"w{i}-{j}" for i in range(4) for j in range(3))
    assert all(r.info.status == 'FINISHED' and len(r.data.params) == 10 for r in runs)
    assert all(len(c.get_metric_history(r.info.run_id, 'a')) == 10 for r in runs)      # no write lost


# --- the compose file --------------------------------------------------------------------------------------------

def test_compose_file_describes_the_team():
    """deploy/compose.yaml: postgres (the official image, a volume, a health check, the other databases made by an
    init script), mlflow (basic-auth on PostgreSQL, serving the artifacts) and tune (digit-tune workers, scalable),
    with every secret interpolated from the env file (deploy/.env, out of git), never written in. Checked for structure
    here; `docker compose config` checks it against the Compose specification where Docker Compose is installed."""
    c = yaml.safe_load(COMPOSE.read_text())
    assert set(c) <= {'services', 'volumes', 'networks'}             # no `name:` (docker-compose 1.29)
    s = c['services']
    assert set(s) == {'postgres', 'mlflow', 'tune'}
    pg, ml, tune = s['postgres'], s['mlflow'], s['tune']
    assert re.fullmatch(r'\$\{POSTGRES_IMAGE:-postgres:\d+(\.\d+)?\}', pg['image'])   # official image, major pinned
    mounts = [v.split(':') for v in pg['volumes']]
    assert ['pgdata', '/var/lib/postgresql/data'] in mounts and 'pgdata' in c['volumes']
    init = [m for m in mounts if m[1].startswith('/docker-entrypoint-initdb.d/')]
    sql = (COMPOSE.parent/init[0][0]).read_text()
    assert pg['environment']['POSTGRES_DB'] == 'mlflow'
    assert {m.lower() for m in re.findall(r'^CREATE DATABASE (\w+);', sql, re.M | re.I)} == {'mlflow_auth', 'optuna'}
    assert 'pg_isready' in ' '.join(pg['healthcheck']['test'])
    for svc in (ml, tune):                                                    # built here: the Dockerfiles exist
        b = svc['build']
        assert (COMPOSE.parent/b['context']/b.get('dockerfile', 'Dockerfile')).resolve().is_file()
    assert ml['depends_on']['postgres']['condition'] == 'service_healthy'
    assert tune['depends_on']['mlflow']['condition'] == 'service_healthy' and ml['healthcheck']['test']
    cmd = ' '.join(ml['command'])
    for part in ('server --app-name basic-auth', '--host 0.0.0.0', '--artifacts-destination /artifacts',
                 '--backend-store-uri postgresql+psycopg://digit@postgres:5432/mlflow'): assert part in cmd
    ini = (COMPOSE.parent/'basic_auth.ini').read_text()
    assert 'database_uri = postgresql+psycopg://digit@postgres:5432/mlflow_auth' in ini
    tcmd = ' '.join(tune['command'])
    assert tcmd.startswith('digit-tune --storage postgresql://digit@postgres:5432/optuna')
    assert tune['environment']['MLFLOW_TRACKING_URI'] == 'http://mlflow:5000'
    assert not {'container_name', 'ports'} & set(tune)                         # `--scale tune=3` needs neither
    # secrets: interpolated from the env file and required (`:?`), never a value; no password in any URL
    secret = re.compile(r'PASSWORD|SECRET|TOKEN')
    for name, svc in s.items():
        assert 'env_file' not in svc
        for k, v in svc.get('environment', {}).items():
            if secret.search(k): assert re.fullmatch(r'\$\{\w+:\?[^}]+\}', str(v)), (name, k, v)
    text = COMPOSE.read_text() + ini + sql
    assert not re.search(r'://[^/\s:@]+:[^/\s@]+@', text)
    used = set(re.findall(r'\$\{(\w+)', COMPOSE.read_text()))
    example = (COMPOSE.parent/'.env.example').read_text()
    listed = set(re.findall(r'^#? ?(\w+)=', example, re.M))
    assert used <= listed, used - listed                                     # the example names every variable
    assert all(v == '' for k, v in re.findall(r'^(\w+)=(.*)$', example, re.M) if secret.search(k))
    assert subprocess.run(['git', 'check-ignore', '-q', 'deploy/.env'], cwd=ROOT).returncode == 0   # out of git


def test_compose_config_by_docker(tmp_path):
    "`docker compose config` (Docker's own parser and the Compose specification), where Docker Compose exists."
    compose = compose_command()
    if compose is None: pytest.skip("neither `docker compose` nor docker-compose is installed (apt-get install "
                                    "docker-compose): deploy/compose.yaml is checked for structure only")
    example = (COMPOSE.parent/'.env.example').read_text()
    env = tmp_path/'env'
    env.write_text(re.sub(r'^(\w*(PASSWORD|SECRET_KEY))=$', r'\1=not-a-secret', example, flags=re.M))
    r = subprocess.run([*compose, '-f', str(COMPOSE), '--env-file', str(env), 'config', '-q'],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    (tmp_path/'empty').write_text('')
    r = subprocess.run([*compose, '-f', str(COMPOSE), '--env-file', str(tmp_path/'empty'), 'config', '-q'],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and 'POSTGRES_PASSWORD' in r.stderr            # no secrets, no start
