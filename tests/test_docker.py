"""The Docker image, built and run for real (issue 24): the Dockerfile builds (on the CPU torch index where it is
reachable, else on the default index with torch's wheels served from a folder on this host, filled only when the
image's torch layer is not cached);
`digit-pipeline` runs in it on bind-mounted host folders that docker creates as root, MNIST mounted read-only and
no network, and gets the host's dataset version; `digit-predict` reads a mounted folder; `digit-serve` answers
/health and a prediction and docker reports the container healthy; the commands run as uid 1000, not root; a folder
the chosen user cannot write is one line.

The engine: the one the docker CLI reaches; else, as root where Debian's `dockerd` is installed, one started for
this module (its images and layers kept in /var/tmp/digit-docker between runs, so later builds are cached) and
stopped at the end. The base image: `python:3.11-slim` when the engine has it, else one made from Debian's packages
by docker/debian-base.sh (debootstrap; built once, kept). Skipped, with the reason, where none of this is possible
or where the disk has no room for a first build (about NEED_GB GB: a full disk would fail every other test).

The slow steps overlap where they need not wait for each other: torch's wheels download while the base image is made,
the team stack's images build and its PostgreSQL and MLflow server start while the project's image builds, and the
pipeline's container runs while the team stack's test does (it comes first)."""
import http.server, json, os, re, shutil, signal, subprocess, threading, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
import pytest
from PIL import Image
from helpers import ROOT, compose_command, free_port

pytestmark = pytest.mark.slow
CACHE = Path(os.environ.get('DIGIT_DOCKER_CACHE', '/var/tmp/digit-docker'))   # engine data: kept between runs
IMAGE = 'digit-recognition:test'
NEED_GB = 15                # a first build's peak, measured here: 12 GB (wheels, pip's copy, the venv)
TINY = ['--epochs', '1', '--max-train-samples', '3000', '--width', '16', '--min-accuracy', '0.5', '--no-tta']
# Neither the training pool of non-digits nor the photographed and drawn views (a minute and a half of CPU in a
# container): the tests check the folders, the users and the dataset's version, which depends on MNIST's splits only.
MNIST_ONLY = ['-e', 'DIGIT_DATA_OUTLIERS=0', '-e', 'DIGIT_DATA_VIEWS=0']


def docker_cli() -> str|None:
    "Debian's docker CLI (it builds with BuildKit without the buildx plugin), else the one on PATH."
    return '/usr/bin/docker' if os.access('/usr/bin/docker', os.X_OK) else shutil.which('docker')


def threads() -> list:
    """`-e` options passing this process's OpenMP settings on to a container (`make test` sets one thread, no spinning):
    a container does not inherit them, and the pipeline's container, two tune workers and pytest's workers each
    spinning two OpenMP threads on two cores made the pipeline take over 15 minutes in CI."""
    return [o for k in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY') if k in os.environ
            for o in ('-e', f"{k}={os.environ[k]}")]


class Engine:
    "The docker CLI `cli` talking to an engine (`env` names its socket); `run` a docker command, return its result."
    def __init__(self, cli, env): self.cli, self.env = cli, env
    def __call__(self, *args, timeout=600, check=True, **kw) -> subprocess.CompletedProcess:
        if args[:1] == ('run',): args = ('run', *threads(), *args[1:])
        r = subprocess.run([self.cli, *map(str, args)], env=self.env, capture_output=True, text=True,
                           timeout=timeout, **kw)
        cmd = ' '.join(map(str, args))[:200]
        if check: assert r.returncode == 0, f"docker {cmd}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r
    def answers(self) -> bool:
        try: return self('info', check=False, timeout=20).returncode == 0
        except subprocess.TimeoutExpired: return False


@pytest.fixture(scope='module')
def engine():
    "An engine to build and run on (see the module's docstring)."
    cli = docker_cli()
    if cli is None: pytest.skip("no docker CLI (Debian: apt-get install docker.io)")
    env = {**os.environ, 'DOCKER_BUILDKIT': '1'}
    e = Engine(cli, env)
    if e.answers():
        yield e; return
    dockerd = shutil.which('dockerd') or ('/usr/sbin/dockerd' if os.path.exists('/usr/sbin/dockerd') else None)
    if dockerd is None or os.geteuid() != 0:
        pytest.skip("no Docker engine answers and none can be started here (it needs root and Debian's docker.io)")
    sock = CACHE/'docker.sock'
    for d in ('engine', 'exec'): (CACHE/d).mkdir(parents=True, exist_ok=True)
    log = open(CACHE/'dockerd.log', 'w')
    proc = subprocess.Popen([dockerd, '--data-root', CACHE/'engine', '--exec-root', CACHE/'exec',
                             '--pidfile', CACHE/'dockerd.pid', '-H', f"unix://{sock}", '--iptables=false',
                             '--ip6tables=false', '--bridge=none'], stdout=log, stderr=subprocess.STDOUT)
    e.env['DOCKER_HOST'] = f"unix://{sock}"
    for _ in range(60):
        if proc.poll() is not None or e.answers(): break
        time.sleep(1)
    if proc.poll() is not None or not e.answers():
        proc.kill()
        pytest.skip(f"dockerd did not start: {(CACHE/'dockerd.log').read_text()[-300:]}")
    yield e
    proc.send_signal(signal.SIGTERM)
    try: proc.wait(60)
    except subprocess.TimeoutExpired: proc.kill()


def debian_mirror() -> str:
    "The Debian mirror this machine's apt uses (its sources), else Debian's own."
    for f in [Path('/etc/apt/sources.list'), *Path('/etc/apt/sources.list.d').glob('*')]:
        try: m = re.search(r'(?:^URIs:\s*|^deb\s+(?:\[[^]]*\]\s+)?)(\S+/debian)/?\s', f.read_text(), re.M)
        except OSError: continue
        if m: return m.group(1)
    return 'http://deb.debian.org/debian'


@pytest.fixture(scope='module')
def base_image(engine):
    "A Python 3.11 base image: python:3.11-slim if the engine has it, else Debian's, made once by debian-base.sh."
    for name in ('python:3.11-slim', 'digit-base:bookworm'):
        if engine('image', 'inspect', name, check=False).returncode == 0: return name
    if not shutil.which('debootstrap') or os.geteuid() != 0:
        pytest.skip("no python:3.11-slim image and no registry here; making one needs root and debootstrap "
                    "(apt-get install debootstrap)")
    r = subprocess.run([ROOT/'docker/debian-base.sh', 'digit-base:bookworm', debian_mirror()], env=engine.env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return 'digit-base:bookworm'


def reachable(url) -> bool:
    try: urllib.request.urlopen(url, timeout=5).close(); return True
    except Exception: return False


class TorchArgs(list):
    "The build's arguments for torch, and `failed`: why the wheels could not be downloaded, if they could not."
    def __init__(self, args, failed=()): super().__init__(args); self.failed = failed


@pytest.fixture(scope='module')
def background():
    "Threads for the module's slow steps that need not wait for each other (builds, the pipeline's container)."
    with ThreadPoolExecutor(4) as pool: yield pool


@pytest.fixture(scope='module')
def torch_source(engine, background):
    """Build arguments for torch: the CPU index where it is reachable; else the default index, with torch's wheels (at
    constraints.txt's versions) served to the build over HTTP (PIP_FIND_LINKS) from a folder they are downloaded into
    when the build first asks for them, that is, only when the image's torch layer is not cached (where there is no
    image yet, they are downloaded at once, while the base image is made)."""
    if reachable('https://download.pytorch.org/whl/cpu/'): yield TorchArgs([]); return
    wheels, lock, failed = CACHE/'wheels', threading.Lock(), []
    pins = [l.strip() for l in (ROOT/'constraints.txt').read_text().splitlines()
            if l.startswith(('torch==', 'torchvision=='))]
    def download():
        with lock:
            if (wheels/'.complete').exists(): return
            wheels.mkdir(parents=True, exist_ok=True)
            r = subprocess.run([ROOT/'.venv/bin/python', '-m', 'pip', 'download', '--quiet', '-d', wheels, *pins,
                                '-c', ROOT/'constraints.txt'], capture_output=True, text=True, timeout=1200)
            if r.returncode:                    # `image` says it, should the build then fail
                failed.append(f"pip download {' '.join(pins)}: {r.stderr[-2000:]}")
                raise AssertionError(failed[-1])
            (wheels/'.complete').touch()
    class Wheels(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            try: download()
            except AssertionError as e: self.send_error(500, str(e)[-300:]); return
            super().do_GET()
        def log_message(self, *a): pass
    if engine('image', 'inspect', IMAGE, check=False).returncode: background.submit(download)
    handler = partial(Wheels, directory=str(wheels))
    try: srv = http.server.ThreadingHTTPServer(('127.0.0.1', 48765), handler)   # one URL: the layer stays cached
    except OSError: srv = http.server.ThreadingHTTPServer(('127.0.0.1', free_port()), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield TorchArgs(['--build-arg', 'TORCH_INDEX=', '--build-arg',
                     f"PIP_FIND_LINKS=http://127.0.0.1:{srv.server_port}/"], failed)
    srv.shutdown()


def room_to_build(engine) -> None:
    """Skip, with the numbers, where the disk holding the engine's data has too little room to build the image: a full
    disk would break every other test running beside this module. A first build needs about NEED_GB (torch's wheels,
    pip's copy of them in the build, the installed environment); a rebuild on cached layers, far less."""
    built = engine('image', 'inspect', IMAGE, check=False).returncode == 0
    root = engine('info', '--format', '{{.DockerRootDir}}').stdout.strip()
    need, free = (3 if built else NEED_GB), shutil.disk_usage(root if os.path.isdir(root) else CACHE).free/1e9
    if free < need: pytest.skip(f"building {IMAGE} needs about {need} GB free on {root}; {free:.1f} GB are")


@pytest.fixture(scope='module')
def team_images(engine, base_image, background):
    """The team stack's PostgreSQL and MLflow images (deploy/), built in the background beside the project's image: a
    function that waits for them and returns their names (None without Docker Compose). PostgreSQL: the official image
    if the engine has it, else deploy/postgres.Dockerfile's, from Debian."""
    if compose_command() is None: return None                   # the test says why it is skipped
    pg = 'postgres:17'
    def build(name, dockerfile):
        engine('build', '--network', 'host', '-f', ROOT/'deploy'/dockerfile, '--build-arg', f"BASE_IMAGE={base_image}",
               '-t', name, ROOT, timeout=900)
        return name
    if engine('image', 'inspect', pg, check=False).returncode != 0:
        pg = background.submit(build, 'digit-postgres:test', 'postgres.Dockerfile')
    mlflow = background.submit(build, 'digit-mlflow-server:test', 'mlflow.Dockerfile')
    return lambda: (pg if isinstance(pg, str) else pg.result(), mlflow.result())


@pytest.fixture(scope='module')
def team_stack(engine, team_images, background, tmp_path_factory):
    """deploy/compose.yaml's PostgreSQL and MLflow server with login, brought up in the background as soon as their
    images are built (the tune workers wait for the project's image): a function that waits for the MLflow server to
    answer on its published port and returns `(compose, port, password, project)`, `compose(*args)` running docker
    compose on the stack (None without Docker Compose). Taken down, volumes and all, at the end of the module."""
    import secrets
    if team_images is None: yield None; return
    d, compose = tmp_path_factory.mktemp('team-stack'), compose_command()
    password, project, port = secrets.token_urlsafe(16), f"digit-team-test-{os.getpid()}", free_port()
    def c(*args, timeout=600):
        r = subprocess.run([*compose, '-f', ROOT/'deploy/compose.yaml', '--env-file', d/'env', *map(str, args)],
                           env=engine.env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"compose {' '.join(map(str, args))}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout
    def up():
        pg, mlflow_image = team_images()
        (d/'env').write_text(f"COMPOSE_PROJECT_NAME={project}\nPOSTGRES_PASSWORD={secrets.token_urlsafe(16)}\n"
                             f"MLFLOW_ADMIN_PASSWORD={password}\nMLFLOW_SECRET_KEY={secrets.token_urlsafe(16)}\n"
                             f"MLFLOW_TRACKING_PASSWORD={password}\nPOSTGRES_IMAGE={pg}\n"
                             f"MLFLOW_IMAGE={mlflow_image}\nDIGIT_IMAGE={IMAGE}\nSTUDY=team\nTRIALS=2\n"
                             f"POSTGRES_PORT={free_port()}\nMLFLOW_PORT={port}\n"
                             f"MLFLOW_ALLOWED_HOSTS=mlflow:5000,127.0.0.1:{port}\n"   # the host names it answers to
                             "MLFLOW_WORKERS=1\n")                           # two workers' requests: one is plenty
        c('up', '-d', 'mlflow')                                      # after PostgreSQL is healthy
        for _ in range(180):                                         # the published port, from this host
            if reachable(f"http://127.0.0.1:{port}/health"): return c, port, password, project
            time.sleep(1)
        raise AssertionError(f"the MLflow server did not answer:\n{c('logs', '--tail', '40')}")
    started = background.submit(up)
    yield started.result
    if (d/'env').exists(): c('down', '-v', '--remove-orphans')      # again, if the test did not get there


@pytest.fixture(scope='module')
def image(engine, base_image, torch_source, team_stack):
    """The project's image, built from the Dockerfile (`--network host`: pip reaches the index and the wheel folder),
    while the team stack's images build and its servers start. The wheels are removed once it is built: its torch
    layer stays cached, and they are 4 GB."""
    room_to_build(engine)
    try: engine('build', '--network', 'host', '--build-arg', f"BASE_IMAGE={base_image}", *torch_source, '-t', IMAGE,
                ROOT, timeout=1800)
    except AssertionError as e:     # pip fell back to the index after the wheel folder failed: say why it failed
        raise AssertionError('\n'.join([*torch_source.failed, str(e)])) from None
    finally: shutil.rmtree(CACHE/'wheels', ignore_errors=True)
    return IMAGE


@pytest.fixture(scope='module')
def project_run(engine, image, mnist_dir, data_ready, tmp_path_factory, background):
    """The tiny pipeline, run in the container on a project's folders on the host, in the background (the team stack's
    test runs meanwhile): a function that waits for it and returns the folder, its mounts and the output."""
    d = tmp_path_factory.mktemp('docker-project')          # data/, runs/, ... do not exist: docker makes them
    mounts = [f"-v{d/h}:/app/{c}" for h, c in (('data', 'data'), ('dataset', 'dataset_cleaned'), ('runs', 'runs'),
                                                  ('results', 'training_results'))]
    r = background.submit(engine, 'run', '--rm', '--network', 'none', *mounts, '-v', f"{mnist_dir}:/mnist:ro", '-e',
                          'MNIST_DIR=/mnist', *MNIST_ONLY, image, 'digit-pipeline', *TINY, timeout=1800)
    return lambda: (d, mounts, r.result().stdout + r.result().stderr)


@pytest.fixture(scope='module')
def project(project_run):
    "A project's folders on the host, the tiny pipeline run in the container on them; the folder and its output."
    return project_run()


def mnist_digits(n) -> tuple:
    "`n` MNIST test digits (28 x 28 uint8, white ink on black) and their labels, from the host's dataset."
    from digit_recognition.data import load_cleaned
    x, y = load_cleaned(splits=('test',)).test
    return x[:n, 0].numpy(), y[:n].tolist()


def test_the_team_stack(engine, image, team_stack, project_run, mnist_dir):
    """deploy/compose.yaml brought up (`team_stack`: PostgreSQL and the MLflow server with login, started while the
    project's image was built), then two digit-tune workers sharing one tiny study; then `down -v` leaves nothing
    behind. Docker Compose: the CLI's plugin or Debian's docker-compose 1.29. First in the module: the pipeline's
    container (`project_run`) runs meanwhile."""
    import base64
    if team_stack is None: pytest.skip("neither `docker compose` nor docker-compose is installed (apt-get install "
                                       "docker-compose)")
    c, port, password, project = team_stack()
    try:
        c('run', '--rm', '-v', f"{mnist_dir}:/mnist:ro", '-e', 'MNIST_DIR=/mnist', *MNIST_ONLY, *threads(), 'tune',
          'digit-data')
        tiny = ['-e', 'DIGIT_TRAIN_EPOCHS=1', '-e', 'DIGIT_TRAIN_MAX_TRAIN_SAMPLES=2000',
                '-e', 'DIGIT_TRAIN_WIDTH=16', *MNIST_ONLY, *threads()]
        workers = [c('run', '-d', *tiny, 'tune').strip().splitlines()[-1] for _ in range(2)]   # `up --scale tune=2`
        codes = [engine('wait', w, timeout=900).stdout.strip() for w in workers]
        logs = [engine('logs', w, check=False) for w in workers]
        assert codes == ['0', '0'], [l.stdout[-2000:] + l.stderr[-2000:] for l in logs]
        best = c('run', '--rm', 'tune', 'digit-tune', '--best', 'team', '--storage',
                 'postgresql://digit@postgres:5432/optuna')
        assert len(re.findall(r'\|\s*ok\s*\|', best)) >= 2, best                   # the trials' table
        auth = base64.b64encode(f"admin:{password}".encode()).decode()     # the runs, on the MLflow server
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                     json.dumps({'max_results': 100}).encode(),
                                     {'Authorization': f"Basic {auth}", 'Content-Type': 'application/json'})
        names = [e['name'] for e in json.loads(urllib.request.urlopen(req, timeout=30).read())['experiments']]
        assert len(names) >= 2, names
    finally:
        c('down', '-v', '--remove-orphans')
        for w in locals().get('workers', []): engine('rm', '-fv', w, check=False)
    left = engine('volume', 'ls', '-q', '--filter', f"label=com.docker.compose.project={project}").stdout
    assert left.strip() == ''


def test_pipeline_on_bind_mounts(project):
    "The documented `docker run -v ...` works as written: the folders docker made are uid 1000's, the data the host's."
    d, _, out = project
    assert 'Traceback' not in out and 'champion' in out, out[-2000:]
    for h in ('data', 'dataset', 'runs', 'results'): assert (d/h).stat().st_uid == 1000, h
    assert any((d/'runs').iterdir())                                         # the MLflow store, on the host
    inside = json.loads((d/'dataset'/'manifest.json').read_text())['version']
    here = json.loads((ROOT/'dataset_cleaned'/'manifest.json').read_text())['version']
    assert inside == here                                       # same data, same version, whatever Python wrote it


def test_predict_on_a_mounted_folder(engine, image, project, tmp_path):
    "digit-predict reads a folder of images mounted read-only, with the champion the pipeline registered."
    d, mounts, _ = project
    x, y = mnist_digits(6)
    for i, a in enumerate(x): Image.fromarray(255 - a).resize((112, 112)).save(tmp_path/f"d{i}-{y[i]}.png")
    tmp_path.chmod(0o755)                                      # pytest's folders are its owner's alone
    r = engine('run', '--rm', '--network', 'none', *mounts, '-v', f"{tmp_path}:/images:ro", image,
               'digit-predict', '/images', '--format', 'json')
    got = json.loads(r.stdout)
    assert len(got) == 6
    assert sum(g['digit'] == int(Path(g['source']).stem.split('-')[1]) for g in got) >= 4, got


def test_serve_is_healthy_and_not_root(engine, image, project):
    "digit-serve in the container: /health and a prediction from the host, docker says healthy, uid 1000."
    d, mounts, _ = project
    port, name = free_port(), f"digit-serve-test-{os.getpid()}"
    engine('run', '-d', '--name', name, '--network', 'host', '--health-interval', '2s', '--health-start-period',
           '60s', *mounts, image, 'digit-serve', '--port', port)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            if reachable(f"{url}/ready"): break
            time.sleep(1)
        else: pytest.fail(engine('logs', name, check=False).stderr[-2000:])
        x, y = mnist_digits(1)
        body = json.dumps({'pixels': x[0].tolist()}).encode()
        req = urllib.request.Request(f"{url}/predict", body, {'Content-Type': 'application/json'})
        a = json.loads(urllib.request.urlopen(req, timeout=30).read())
        assert a['digit'] == y[0] and a['model']['name'], a
        for _ in range(60):
            health = engine('inspect', '--format', '{{.State.Health.Status}}', name).stdout.strip()
            if health != 'starting': break
            time.sleep(1)
        assert health == 'healthy'
        pid = engine('inspect', '--format', '{{.State.Pid}}', name).stdout.strip()    # the server, seen from here
        uid = next(l.split()[1] for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith('Uid:'))
        assert uid == '1000'
    finally: engine('rm', '-fv', name, check=False)


def test_an_unwritable_folder_is_one_line(engine, image, tmp_path):
    "`docker run --user` with a mounted folder that user cannot write: one line naming it, no traceback."
    (tmp_path/'runs').mkdir(mode=0o755)
    r = engine('run', '--rm', '--network', 'none', '--user', '1234:1234', '-v', f"{tmp_path/'runs'}:/app/runs", image,
               'digit-pipeline', check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and '/app/runs is not writable by uid 1234' in lines[0], r.stderr
