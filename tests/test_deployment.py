"""What lets another person deploy and trust the project: the Dockerfile (parsed by Docker's own parser), the
workflows (actionlint), DEPLOYMENT.md's commands (run for real in a copy of the project) and the documentation."""
import json, os, re, shutil, socket, subprocess
import pytest
from helpers import ROOT, BIN

SECRET = re.compile(r'(TOKEN|PASSWORD|SECRET|API_KEY|ACCESS_KEY)', re.I)


def stages(instructions):
    "The build stages, each a list of instructions from its FROM (the ARGs before the first FROM are left out)."
    out = []
    for i in instructions:
        if i.cmd == 'FROM': out.append([])
        if out: out[-1].append(i)
    return out


def test_dockerfile():
    import dockerfile
    ins = dockerfile.parse_file(str(ROOT/'Dockerfile'))
    st = stages(ins)
    assert len(st) == 1, "one stage: a second would copy the virtual environment into a layer of its own"
    args = dict(v.split('=', 1) for i in ins if i.cmd == 'ARG' for v in i.value if '=' in v)
    assert args['BASE_IMAGE'] == 'python:3.11-slim' and all(s[0].value[0] == '${BASE_IMAGE}' for s in st)
    assert args['TORCH_INDEX'] == 'https://download.pytorch.org/whl/cpu'
    final = st[-1]
    # The entrypoint starts as root only to give mounted folders to the runtime user, then drops root (setpriv);
    # tests/test_docker.py checks in a running container that commands run as uid 1000.
    assert not [i for i in final if i.cmd == 'USER']
    assert 'exec setpriv --reuid="$RUNTIME_USER"' in (ROOT/'docker'/'entrypoint.sh').read_text()
    entry = [i for i in final if i.cmd == 'ENTRYPOINT']
    assert entry and entry[-1].json and entry[-1].value == ('digit-entrypoint',)
    assert [i.value for i in final if i.cmd == 'CMD'][-1] == ('digit-pipeline',)
    # digit-serve: on every interface of the container, on the exposed port, checked by the HEALTHCHECK.
    from digit_recognition.config import Settings
    env = dict(kv for i in final if i.cmd == 'ENV' for kv in zip(i.value[::2], i.value[1::2]))
    assert env.get('DIGIT_SERVE_HOST') == '0.0.0.0' and 'DIGIT_SERVE_PORT' not in env
    port = Settings(root=ROOT).get('serve', 'port')
    assert [i.value for i in final if i.cmd == 'EXPOSE'] == [(str(port),)]
    health = [i for i in final if i.cmd == 'HEALTHCHECK']
    assert len(health) == 1 and health[0].json and health[0].value == ('CMD', 'digit-entrypoint', 'healthcheck')
    assert any(f.startswith('--start-period=') for f in health[0].flags)
    for i in ins:                                    # no secrets baked in, no .env copied
        if i.cmd in ('ENV', 'ARG'): assert not any(SECRET.search(v) for v in i.value[::2]), i.original
        if i.cmd in ('COPY', 'ADD'): assert not any('.env' in v for v in i.value), i.original
    # The install steps are make setup's, with PyTorch's CPU index.
    runs = [i.value[0] for i in ins if i.cmd == 'RUN']
    make = (ROOT/'Makefile').read_text()
    torch_line = re.search(r'\$\(BIN\)/(python -m pip install --quiet -c constraints.txt torch torchvision '
                           r'--index-url) \$\(TORCH_INDEX\)',
                           make).group(1)
    assert f'{torch_line.removesuffix(" --index-url")} ${{TORCH_INDEX:+--index-url "$TORCH_INDEX"}}' in runs
    assert any(r.startswith("python -m pip install --quiet -c constraints.txt '/tmp/src[train,serve]'") for r in runs)
    assert '$(BIN)/python -m pip install --quiet -c constraints.txt -e' in make
    ignore = (ROOT/'.dockerignore').read_text().split()
    assert {'.env', '.venv', 'data/', 'dataset_cleaned/', 'training_results/', 'mlflow.db', 'mlruns/'} <= set(ignore)
    # The entrypoint script is the project's CLI.
    ep = ROOT/'docker'/'entrypoint.sh'
    assert os.access(ep, os.X_OK)
    r = subprocess.run(['sh', str(ep), '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and 'digit-pipeline' in r.stdout and 'digit-serve' in r.stdout
    r = subprocess.run(['sh', str(ep), 'rm', '-rf', '/'], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown command 'rm'")
    r = subprocess.run(['sh', str(ep), 'digit-predict', '--help'], capture_output=True, text=True,
                       env={**os.environ, 'PATH': f"{BIN}:{os.environ['PATH']}"})
    assert r.returncode == 0 and '--server' in r.stdout
    r = subprocess.run(['sh', str(ep), 'digit-serve', '--help'], capture_output=True, text=True,
                       env={**os.environ, 'PATH': f"{BIN}:{os.environ['PATH']}"})
    assert r.returncode == 0 and '--reload-seconds' in r.stdout


# A stand-in for digit-serve (a real HTTP server on /health, with digit-serve's command line): the HEALTHCHECK only
# needs the process's arguments and /health. DEPLOYMENT.md's testable block runs the check on a real digit-serve.
HEALTH_SERVER = '''import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == '/health' else 404); self.end_headers(); self.wfile.write(b'{}')
    def log_message(self, *a): pass
s = http.server.HTTPServer(('127.0.0.1', 0), H)
print(s.server_port, flush=True); s.serve_forever()'''


def test_docker_healthcheck():
    "Healthy for a container that runs no server (the pipeline); for digit-serve, healthy when its /health answers."
    ep = ROOT/'docker'/'entrypoint.sh'
    env = {**os.environ, 'PATH': f"{BIN}:{os.environ['PATH']}"}
    env.pop('DIGIT_SERVE_PORT', None)
    check = lambda pid, **kw: subprocess.run(['sh', str(ep), 'healthcheck', str(pid)], capture_output=True, text=True,
                                             env={**env, **kw}, timeout=30)
    sleep = [str(BIN/'python'), '-c', 'import time; time.sleep(60)']
    with subprocess.Popen([*sleep, '/opt/venv/bin/digit-pipeline']) as pipeline:
        try: assert check(pipeline.pid).returncode == 0                # not a server: nothing to check
        finally: pipeline.kill()
    r = check(2**22 + 1)
    assert r.returncode == 1 and 'no process' in r.stderr
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = str(s.getsockname()[1])   # nothing listens there
    for args, used in ((['--port', port], port), ([f'--port={port}'], port), ([], '9')):
        with subprocess.Popen([*sleep, '/opt/venv/bin/digit-serve', *args]) as down:
            try:
                r = check(down.pid, DIGIT_SERVE_PORT='9')                # --port, else DIGIT_SERVE_PORT
                assert r.returncode == 1 and f"http://127.0.0.1:{used}/health" in r.stderr, r.stderr
            finally: down.kill()
    with subprocess.Popen([str(BIN/'python'), '-c', HEALTH_SERVER, 'digit-serve', '--host', '0.0.0.0'],
                          stdout=subprocess.PIPE, text=True) as up:
        try:
            port = up.stdout.readline().strip()
            assert check(up.pid, DIGIT_SERVE_PORT=port).returncode == 0
            assert check(up.pid, DIGIT_SERVE_PORT='1').returncode == 1
        finally: up.kill()


def test_workflows_pass_actionlint():
    wf = ROOT/'.github'/'workflows'
    files = sorted(wf.glob('*.yml'))
    assert {f.name for f in files} >= {'python-tests.yml', 'docker-build.yml', 'docs.yml'}
    r = subprocess.run([str(BIN/'actionlint'), *map(str, files)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    t = (wf/'python-tests.yml').read_text()
    assert 'make setup' in t and 'make test' in t and 'cache: pip' in t
    assert 'if: failure()' in t and 'upload-artifact' in t
    always = r'if: always\(\)\n\s+uses: actions/upload-artifact@\S+\n(.*\n){1,3}\s+path: test-reports/'
    assert 'chromium' in t and re.search(always, t), "test-reports/ (the page's screenshot) is uploaded every time"
    d = (wf/'docker-build.yml').read_text()
    assert 'setup-buildx-action' in d and '${{ github.sha }}' in d and ':latest' in d
    assert 'secrets.REGISTRY_PASSWORD' in d
    # the smoke test of tests/test_docker.py runs before anything is pushed: tiny pipeline, digit-serve healthy
    smoke, push = d.index('digit-pipeline --epochs 1'), d.index('push: true')
    assert smoke < d.index("State.Health.Status}}' serve)\" = healthy") < push and 'load: true' in d
    assert "github.ref == 'refs/heads/main'" in d and 'pull_request' in d
    docs = (wf/'docs.yml').read_text()
    assert 'quarto-dev/quarto-actions/setup' in docs and 'nbdev-docs' in docs and 'deploy-pages' in docs


def marked_blocks(text):
    return re.findall(r'<!-- test -->\s*```(?:sh|bash)\n(.*?)```', text, re.S)


def test_deployment_guide_is_bilingual():
    text = (ROOT/'DEPLOYMENT.md').read_text()
    sections = re.split(r'^## ', text, flags=re.M)[1:]
    assert len(sections) >= 13
    for s in sections:
        assert re.search(r'[\u4e00-\u9fff]', s) and re.search(r'\b(the|and|is|to)\b', s), s[:60]
    for topic in ('MLFLOW_TRACKING_URI', 'DAGSHUB_USER_TOKEN', 'MNIST_DIR', 'papermill', 'digit-evaluate', 'champion',
                  'mlflow models serve', 'docker run', 'actionlint', 'Troubleshooting',
                  'digit-serve', 'make serve', '/predict/batch', '/ready', 'reload_seconds', '--workers', 'max_bytes',
                  'max_pixels', 'max_batch', '@challenger', 'client_max_body_size', 'X-Forwarded-Proto', 'HEALTHCHECK',
                  'DIGIT_SERVE_HOST', '-p 8000:8000'):
        assert topic in text, topic
    blocks = marked_blocks(text)
    assert len(blocks) >= 6
    # digit-serve's block runs on the pipeline's champion and the sample images: after the blocks that make them
    serve = next(i for i, b in enumerate(blocks) if 'digit-serve --port' in b)
    assert serve > max(i for i, b in enumerate(blocks) if 'digit-pipeline' in b or 'sample_' in b and 'save' in b)
    assert 'trap ' in blocks[serve] and 'kill ' in blocks[serve] and 'healthcheck' in blocks[serve]


@pytest.mark.slow
def test_deployment_commands(tmp_path):
    "Every testable block of DEPLOYMENT.md, in order, in a fresh copy of the project with its own store and data."
    text = (ROOT/'DEPLOYMENT.md').read_text()
    proj = tmp_path/'project'
    files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (ROOT/f).is_file(): (proj/f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(ROOT/f, proj/f)
    (proj/'.venv').symlink_to(BIN.parent)
    for d in ('data', 'dataset_cleaned'):      # the session's verified MNIST and dataset: `digit-data` reuses them
        if (ROOT/d).is_dir(): shutil.copytree(ROOT/d, proj/d, ignore=shutil.ignore_patterns('cache'))
    env = {k: v for k, v in os.environ.items() if not k.startswith(('DIGIT_', 'MLFLOW_', 'DAGSHUB_'))}
    env.update(PATH=f"{BIN}:{env['PATH']}", MPLBACKEND='Agg')
    if 'MNIST_DIR' not in env:
        from digit_recognition.config import Settings
        from digit_recognition.mnist import raw_dir
        env['MNIST_DIR'] = str(raw_dir(Settings().path('paths', 'data_dir')))
    for i, block in enumerate(marked_blocks(text)):
        r = subprocess.run(['bash', '-euo', 'pipefail', '-c', block], cwd=proj, env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, f"block {i}:\n{block}\n--- stdout\n{r.stdout[-2000:]}\n--- stderr\n{r.stderr[-2000:]}"
    assert (proj/'mlflow.db').is_file() and (proj/'dataset_cleaned'/'manifest.json').is_file()
    runs = [d.name for d in (proj/'training_results').iterdir() if re.fullmatch(r'[0-9a-f]{32}', d.name)]
    assert len(runs) == 1, runs           # digit-pipeline reused digit-train's run: same parameters, same data
    assert (proj/'predictions.csv').read_text().startswith('file,digit,confidence')
    assert any((proj/'annotated').iterdir())
    for port in set(re.findall(r'digit-serve --port (\d+)', '\n'.join(marked_blocks(text)))):   # no server left behind
        with socket.socket() as s: assert s.connect_ex(('127.0.0.1', int(port))) != 0, port


# The documentation site: Quarto cannot be installed here, so check what can be checked without it.
NOTEBOOKS = sorted((ROOT/'nbs').glob('*.ipynb'))


def test_readme_is_regenerated_from_index(tmp_path):
    args = re.search(r'^README_ARGS = (.*)$', (ROOT/'Makefile').read_text(), re.M).group(1).split()   # as `make readme`
    r = subprocess.run([str(BIN/'jupyter'), 'nbconvert', *args, '--output-dir', str(tmp_path), '--output', 'README'],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path/'README.md').read_text() == (ROOT/'README.md').read_text(), "README.md is stale: run `make readme`"


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_starts_with_title_and_description(nb):
    cells = json.loads(nb.read_text())['cells']
    first = ''.join(cells[0]['source']).strip().splitlines()
    assert cells[0]['cell_type'] == 'markdown' and first[0].startswith('# ') and len(first[0]) > 3
    assert len(first) >= 2 and first[1].startswith('> ') and len(first[1]) > 20


def test_links_and_symbols_resolve():
    import importlib
    from digit_recognition import _modidx
    syms = _modidx.d['syms']
    for nb in NOTEBOOKS:
        for c in json.loads(nb.read_text())['cells']:
            if c['cell_type'] != 'markdown': continue
            text = ''.join(c['source'])
            for link in re.findall(r'\]\(([^)#\s]+)', text):
                if link.startswith(('http://', 'https://', 'mailto:')): continue
                target = (nb.parent/link).resolve()
                alt = target.with_suffix('.ipynb')
                assert target.exists() or alt.exists() or (ROOT/link).exists(), f"{nb.name}: broken link {link}"
            for mod, name in re.findall(r'`(digit_recognition\.\w+)(?:\.(\w+))?`', text):
                m = importlib.import_module(mod)
                assert not name or hasattr(m, name), f"{nb.name}: `{mod}.{name}` does not exist"
    for mod, names in syms.items():       # every exported symbol is documented (nbdev shows its docstring)
        m = importlib.import_module(mod)
        for full in names:
            obj = m
            for part in full.split('.')[2:]: obj = getattr(obj, part)
            if callable(obj) and not any(p.startswith('_') for p in full.split('.')[1:]):
                assert getattr(obj, '__doc__', None), f"{full} has no docstring"


def test_index_has_a_quick_start():
    text = '\n'.join(''.join(c['source']) for c in json.loads((ROOT/'nbs'/'index.ipynb').read_text())['cells'])
    qs = text[text.index('## Quick start'):]
    qs = qs[:qs.index('\n## ', 5)]
    assert 'make pipeline' in qs and 'make test' in qs and 'MNIST_DIR' in qs
    for cmd in ('digit-data', 'digit-train', 'digit-evaluate', 'digit-predict', 'digit-pipeline'):
        assert cmd in text, cmd
