"""The loop closed, for real, on loopback: a tiny champion made by `digit-pipeline` is served by `digit-serve` with
its prediction log; it misreads digits written upside down; 60 of them are corrected through `/feedback`;
`digit-pipeline --feedback` trains on MNIST and those corrections and registers a new champion (it reads the held-out
corrections better than the old one); the running server switches to it without a restart and now reads most of them
right; `/metrics` shows the corrections and the new version; the prediction log holds every answer. `digit-monitor`
then reads that log: the upside-down digits and their corrections are an alert (exit 1), ordinary digits are not."""
import io, json, os, re, subprocess, time, urllib.error, urllib.request, uuid
import numpy as np
import pytest
from PIL import Image
from helpers import BIN, free_port, wait_for_http, run_command, stop

pytestmark = pytest.mark.slow
TINY = ['--epochs', '1', '--max-train-samples', '2000', '--batch-size', '100', '--no-augment', '--no-tta',
        '--min-accuracy', '0', '--quiet']


def post(url, body:bytes, ctype:str) -> tuple:
    req = urllib.request.Request(url, body, {'Content-Type': ctype})
    try:
        with urllib.request.urlopen(req, timeout=60) as r: return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e: return e.code, json.loads(e.read())


def batch(url, images) -> list:
    "The answers of `url`/predict/batch to `images` (28x28 uint8, light ink on black) sent as PNG photos, 32 a request."
    out = []
    for i in range(0, len(images), 32):
        b, parts = uuid.uuid4().hex, []
        for j, a in enumerate(images[i:i + 32]):
            png = io.BytesIO(); Image.fromarray(255 - a).resize((112, 112)).save(png, 'PNG')
            parts.append(f'--{b}\r\nContent-Disposition: form-data; name="files"; filename="{i + j}.png"\r\n'
                         'Content-Type: image/png\r\n\r\n'.encode() + png.getvalue() + b'\r\n')
        status, a = post(f"{url}/predict/batch", b''.join(parts) + f'--{b}--\r\n'.encode(),
                         f'multipart/form-data; boundary={b}')
        assert status == 200, a
        out += a['results']
    return out


@pytest.fixture(scope='module')
def test_split(data_ready):
    from digit_recognition.data import load_cleaned
    x, y = load_cleaned(splits=('test',)).test
    return x.squeeze(1).numpy(), y.numpy()


@pytest.fixture(scope='module')
def project(tmp_path_factory, mnist_dir):
    "A project of its own (DIGIT_HOME): data, runs, registry, prediction log and feedback in one folder."
    home = tmp_path_factory.mktemp('loop')
    env = {k: v for k, v in os.environ.items() if not k.startswith(('DIGIT_', 'MLFLOW_'))}
    env.update(DIGIT_HOME=str(home), MNIST_DIR=str(mnist_dir), MPLBACKEND='Agg', DIGIT_DATA_OUTLIERS='200',
               DIGIT_DATA_VIEWS='200')
    return home, env


def test_the_loop(project, test_split):
    home, env = project
    # only the project's settings: not an MLflow server or settings that another test on this worker left in ours
    env = {**{k: None for k in os.environ if k.startswith(('DIGIT_', 'MLFLOW_')) and k not in env}, **env}
    run = lambda *a: run_command(*a, env=env, cwd=home, check=0)
    out = run('digit-pipeline', *TINY).stdout
    assert re.search(r'registry .* version 1: champion', out), out
    first = re.search(r'^run\s+([0-9a-f]{32})', out, re.M).group(1)
    port = free_port()
    log = open(home/'server.log', 'w')
    server = subprocess.Popen([str(BIN/'digit-serve'), '--port', str(port), '--reload-seconds', '1',
                               '--no-access-log'], cwd=home, env={k: v for k, v in env.items() if v is not None},
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/ready", server, home/'server.log', seconds=120)
        x, y = test_split
        pick = np.flatnonzero(np.isin(y, [2, 3, 4, 5, 7]))[:200]       # digits that upside down are no digit
        flipped, labels = np.rot90(x[pick], 2, axes=(1, 2)).copy(), y[pick]
        before = batch(url, flipped)
        wrong = [i for i, a in enumerate(before) if a['digit'] != labels[i]][:60]
        assert len(wrong) == 60, f"the tiny champion reads {200 - len(wrong)} of 200 upside-down digits"
        for i in wrong:
            status, a = post(f"{url}/feedback", json.dumps({'prediction_id': before[i]['prediction_id'],
                                                           'digit': int(labels[i])}).encode(), 'application/json')
            assert status == 200 and a['saved'], a
        out = run('digit-pipeline', '--feedback', home/'feedback', *TINY[:1], '2', *TINY[2:]).stdout
        assert re.search(r'registry .* version 2: champion \(feedback_accuracy', out), out
        deadline = time.time() + 60                                      # the server follows the alias
        while time.time() < deadline and json.load(urllib.request.urlopen(f"{url}/model"))['version'] != '2':
            time.sleep(0.5)
        after = batch(url, flipped[wrong])
        right = sum(a['digit'] == labels[i] for a, i in zip(after, wrong))
        assert after[0]['model']['version'] == '2' and right >= 42, right   # most of them, now
        metrics = urllib.request.urlopen(f"{url}/metrics").read().decode()
        corrections = sum(float(v) for v in re.findall(r'^digit_corrections_total\{.*\} (\S+)$', metrics, re.M))
        assert corrections == 60 and 'digit_model_info{name="digit-recognizer",version="2"} 1.0' in metrics
        assert 'digit_model_reloads_total 1.0' in metrics
    finally: stop(server)
    import sqlalchemy as sa
    with sa.create_engine(f"sqlite:///{home/'predictions.db'}").connect() as c:
        n, fixed = c.execute(sa.text("select count(*), count(corrected) from predictions")).one()
    assert (n, fixed) == (260, 60)                                      # every answer, written by a clean shutdown
    assert len(list((home/'feedback').glob('[0-9]/*.png'))) == 60
    # the window holds upside-down digits and a correction for a quarter of them: an alert naming the checks
    r = run_command('digit-monitor', '--window-hours', '1', env=env, cwd=home)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr      # one line
    assert r.stderr.startswith('error: monitoring: digits'), r.stdout + r.stderr
    assert 'corrections' in r.stderr.splitlines()[-1] and (home/'training_results'/'monitoring').is_dir()
    # the first champion's answers to ordinary test digits, logged as the server logs them: nothing to report
    from digit_recognition.client import DigitPredictor
    from digit_recognition.predictions import PredictionLog, prediction_row
    p = DigitPredictor.load(str(home/'training_results'/first/'best.pt'))
    lg = PredictionLog(f"sqlite:///{home/'ordinary.db'}").start()
    for a, pr in zip(x[:300], p.predict(list(x[:300]), top_k=10)):
        lg.add(prediction_row(a.tobytes(), pr, {'name': 'digit-recognizer', 'version': '1'}, 8.0))
    lg.close()
    r = run_command('digit-monitor', '--log', home/'ordinary.db', '--window-hours', '1', '--model',
                    'models:/digit-recognizer/1', env=env, cwd=home)
    assert r.returncode == 0, r.stdout + r.stderr
