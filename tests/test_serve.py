"""`digit-serve` for real: uvicorn in a subprocess on 127.0.0.1 with a model trained in this session, registered in a
local MLflow registry; the API's answers and limits, a model swap under a stream of requests, fuzzing from the OpenAPI
schema (schemathesis), and the drawing pad in Debian's Chromium driven by Playwright."""
import base64, io, json, os, subprocess, threading, time, urllib.error, urllib.request, uuid
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from helpers import ROOT, BIN, free_port, wait_for_http

pytestmark = pytest.mark.slow         # a server, a registry and a browser: the slow tier

NAME = 'digit-recognizer'
CHROMIUM = '/usr/bin/chromium'


def register(uri:str, onnx:Path, accuracy:float, alias:str|None='champion') -> tuple:
    "A run holding `onnx` as its model's ONNX file, registered as a new version with `alias`: (version, run id)."
    from mlflow import MlflowClient
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.get_experiment_by_name('serve') or c.get_experiment(c.create_experiment('serve'))
    run = c.create_run(exp.experiment_id)
    rid = run.info.run_id
    c.log_artifact(rid, str(onnx), 'model/artifacts')
    c.log_metric(rid, 'test_accuracy', accuracy); c.log_metric(rid, 'test_ece', 0.01)
    c.set_tag(rid, 'dataset_version', 'v-test'); c.set_terminated(rid)
    try: c.create_registered_model(NAME)
    except Exception: pass                                          # already there
    mv = c.create_model_version(NAME, f"{run.info.artifact_uri}/model", run_id=rid)
    if alias: c.set_registered_model_alias(NAME, alias, mv.version)
    return str(mv.version), rid


class Served:
    "A running digit-serve: `url`, the registry's `uri`, its `log` file and the checkpoint folder `model_dir`."


@pytest.fixture(scope='module')
def server(checkpoint_dir, tmp_path_factory):
    "digit-serve on the registry's champion (version 1: the session's checkpoint), looking at the alias every second."
    d = tmp_path_factory.mktemp('serve')
    uri = f"sqlite:///{d/'mlflow.db'}"
    version, rid = register(uri, checkpoint_dir/'model.onnx', 0.97)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(('DIGIT_', 'MLFLOW_'))}
    env.update(MLFLOW_TRACKING_URI=uri, DIGIT_PATHS_RESULTS_DIR=str(d/'results'), DIGIT_SERVE_MAX_BYTES='300000',
               DIGIT_SERVE_PREDICTION_LOG=str(d/'predictions.db'), DIGIT_PATHS_FEEDBACK_DIR=str(d/'feedback'))
    log = d/'server.log'
    proc = subprocess.Popen([str(BIN/'digit-serve'), '--port', str(port), '--reload-seconds', '1', '--no-access-log'],
                            cwd=ROOT, env=env, stdout=open(log, 'w'), stderr=subprocess.STDOUT)
    s = Served()
    s.url, s.uri, s.log, s.model_dir, s.first = f"http://127.0.0.1:{port}", uri, log, checkpoint_dir, (version, rid)
    s.dir = d
    wait_for_http(f"{s.url}/ready", proc, log, seconds=120)
    yield s
    proc.terminate()
    try: proc.wait(20)
    except subprocess.TimeoutExpired: proc.kill()


def call(url, data=None, ctype=None, method=None, headers=None) -> tuple:
    "`(status, JSON answer)` of one request."
    req = urllib.request.Request(url, data, {**({'Content-Type': ctype} if ctype else {}), **(headers or {})},
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r: return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e: return e.code, json.loads(e.read())


def call_big(url, data, ctype) -> tuple:
    """`(status, JSON answer)` of a POST whose body the server refuses before reading it all: it answers and closes,
    so the rest of the body may not be sent (a broken pipe on a loaded machine), and the answer is read anyway."""
    import http.client
    c = http.client.HTTPConnection(*url.removeprefix('http://').split('/')[0].split(':'), timeout=30)
    c.putrequest('POST', '/' + url.removeprefix('http://').split('/', 1)[1])
    c.putheader('Content-Type', ctype); c.putheader('Content-Length', str(len(data))); c.endheaders()
    try: c.send(data)
    except OSError: pass
    r = c.getresponse()
    return r.status, json.loads(r.read())


def form(*files, field='file') -> tuple:
    "A multipart body with `files` ((name, bytes, content type)), and its content type."
    b = uuid.uuid4().hex
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{field}"; filename="{n}"\r\nContent-Type: {t}\r\n\r\n'
             .encode() + data + b'\r\n' for n, data, t in files]
    return b''.join(parts) + f'--{b}--\r\n'.encode(), f'multipart/form-data; boundary={b}'


def encoded(a:np.ndarray, fmt:str, size=112) -> bytes:
    "MNIST digit `a` as a photo-like file: dark ink on white paper, `size` pixels, in format `fmt`."
    im = Image.fromarray(255 - a).resize((size, size), Image.BILINEAR)
    b = io.BytesIO(); im.convert('RGB' if fmt == 'JPEG' else 'L').save(b, fmt); return b.getvalue()


@pytest.fixture(scope='module')
def digits(checkpoint_dir):
    "Eight test digits (28x28 uint8) the session's model reads correctly and surely, with their labels."
    from digit_recognition.client import DigitPredictor
    x = np.load(checkpoint_dir/'images.npy')
    p = DigitPredictor.load(str(checkpoint_dir/'model.onnx')).predict(list(x))
    keep = [i for i, r in enumerate(p) if r.digit is not None][:8]
    return x[keep], [p[i].digit for i in keep]


def test_each_format_and_json(server, digits):
    x, y = digits
    for i, fmt in enumerate(('PNG', 'JPEG', 'GIF', 'BMP', 'WEBP')):
        name = f"d.{fmt.lower()}"
        status, a = call(f"{server.url}/predict", *form((name, encoded(x[i], fmt), f"image/{fmt.lower()}")))
        assert status == 200, (fmt, a)
        assert a['digit'] == y[i] and a['source'] == name, (fmt, a)
        assert abs(sum(a['probabilities']) - 1) < 1e-3 and len(a['top_k']) == 3
        assert a['model'] == {'name': NAME, 'version': server.first[0], 'run_id': server.first[1]}
    body = json.dumps({'image': base64.b64encode(encoded(x[5], 'PNG')).decode()}).encode()
    status, a = call(f"{server.url}/predict?top_k=10", body, 'application/json')
    assert status == 200 and a['digit'] == y[5] and len(a['top_k']) == 10
    status, a = call(f"{server.url}/predict", json.dumps({'pixels': x[6].tolist()}).encode(), 'application/json')
    assert status == 200 and a['digit'] == y[6], a
    status, a = call(f"{server.url}/predict", *form(('blank.png', encoded(np.zeros((28, 28), np.uint8), 'PNG'),
                                                     'image/png')))
    assert status == 200 and a['digit'] is None and a['reason'] == 'no ink'


def test_health_ready_model_and_docs(server):
    assert call(f"{server.url}/health") == (200, {'status': 'ok'})
    status, r = call(f"{server.url}/ready")
    assert status == 200 and r['ready'] is True
    status, m = call(f"{server.url}/model")
    assert status == 200 and m['name'] == NAME and m['alias'] == 'champion' and m['backend'] == 'onnx'
    assert (m['dataset_version'], m['test_ece']) == ('v-test', 0.01) and m['run_id']
    status, spec = call(f"{server.url}/openapi.json")
    assert {'/predict', '/predict/batch', '/health', '/ready', '/model'} <= set(spec['paths'])
    with urllib.request.urlopen(f"{server.url}/docs") as r: assert b'swagger' in r.read().lower()


def test_batch_with_one_bad_file(server, digits):
    x, y = digits
    files = [(f"{i}.png", encoded(x[i], 'PNG'), 'image/png') for i in range(3)]
    files.insert(1, ('broken.png', b'\x89PNG\r\n\x1a\n broken', 'image/png'))
    status, a = call(f"{server.url}/predict/batch", *form(*files, field='files'))
    assert status == 200, a
    r = a['results']
    assert [e.get('digit') for e in r] == [y[0], None, y[1], y[2]]
    assert r[1] == {'source': 'broken.png', 'error': 'broken.png: not an image (expected PNG, JPEG, GIF, BMP, WEBP)'}
    body = {'images': [{'pixels': x[0].tolist()}, {'image': 'not base64!'}, {'image': '', 'pixels': [[1]]}]}
    status, a = call(f"{server.url}/predict/batch", json.dumps(body).encode(), 'application/json')
    assert status == 422 and a['error'].startswith('images.2'), a          # a malformed body: the request is refused
    body['images'].pop()
    status, a = call(f"{server.url}/predict/batch", json.dumps(body).encode(), 'application/json')
    assert status == 200 and a['results'][0]['digit'] == y[0] and 'base64' in a['results'][1]['error']


def bomb() -> bytes:
    b = io.BytesIO(); Image.new('1', (20_000, 20_000)).save(b, 'PNG'); return b.getvalue()


def test_limits_and_bad_input(server, digits):
    "Every bad request gets one line of JSON and a 4xx; none leaks a path or a traceback; the server stays up."
    x, _ = digits
    png = encoded(x[0], 'PNG')
    tif = io.BytesIO(); Image.new('L', (28, 28)).save(tif, 'TIFF')
    u = f"{server.url}/predict"
    cases = {
        'not an image': (400, call(u, *form(('notes.txt', b'hello, world', 'text/plain')))),
        'empty file': (400, call(u, *form(('empty.png', b'', 'image/png')))),
        'too large': (413, call(u, *form(('huge.png', png + b'\0'*300_000, 'image/png')))),
        'decompression bomb': (413, call(u, *form(('bomb.png', bomb(), 'image/png')))),
        'TIFF': (415, call(u, *form(('scan.tif', tif.getvalue(), 'image/tiff')))),
        'two files': (413, call(u, *form(('a.png', png, 'image/png'), ('b.png', png, 'image/png')))),
        'too many files': (413, call(f"{u}/batch", *form(*[('a.png', png, 'image/png')]*33, field='files'))),
        'no file': (400, call(u, *form(field='file'))),
        'wrong content type': (415, call(u, b'hello', 'text/plain')),
        'bad JSON': (422, call(u, b'{"image": ', 'application/json')),
        'bad base64': (400, call(u, b'{"image": "@@@"}', 'application/json')),
        'top_k': (422, call(f"{u}?top_k=0", *form(('a.png', png, 'image/png')))),
        'body too large': (413, call_big(u, b'x'*2_000_000, 'application/json')),
        'GET': (405, call(u)),
    }
    for what, (expected, (status, a)) in cases.items():
        assert status == expected, (what, status, a)
        assert set(a) == {'error'} and '\n' not in a['error'] and 0 < len(a['error']) < 300, (what, a)
        assert 'Traceback' not in a['error'] and str(ROOT) not in a['error'] and '/tmp' not in a['error'], (what, a)
    assert 'bomb.png' in cases['decompression bomb'][1][1]['error']
    # a body sent without Content-Length (chunked) stops being read at the limit
    import http.client
    c = http.client.HTTPConnection(*server.url.removeprefix('http://').split(':'))
    c.putrequest('POST', '/predict'); c.putheader('Content-Type', 'application/json')
    c.putheader('Transfer-Encoding', 'chunked'); c.endheaders()
    try:
        for _ in range(40): c.send(b'10000\r\n' + b'x'*0x10000 + b'\r\n')
        c.send(b'0\r\n\r\n')
    except OSError: pass                       # the server may answer and close before everything is sent
    r = c.getresponse()
    assert r.status == 413 and 'limit' in json.loads(r.read())['error']
    assert call(f"{server.url}/health")[0] == 200
    assert 'Traceback' not in server.log.read_text()


def test_fuzzing_the_openapi_schema_finds_no_server_error(server):
    "schemathesis generates requests from /openapi.json, valid and invalid ones: no answer is a 5xx."
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {o.path for o in ops} >= {'/predict', '/predict/batch', '/model'}
    seen = []
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[:1 if op.method.upper() == 'GET' else 2]:
            @settings(max_examples=15, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case):
                r = case.call_and_validate(checks=[not_a_server_error])
                seen.append(r.status_code)
            fuzz()
    assert len(seen) > 50 and max(seen) < 500 and any(s >= 400 for s in seen)
    assert call(f"{server.url}/health")[0] == 200


def test_alias_moves_while_requests_stream(server, digits):
    "The champion moves to a new version mid-stream: no request fails, each answer is one version, it changes once."
    x, y = digits
    body = json.dumps({'pixels': x[0].tolist()}).encode()
    answers, stop = [], threading.Event()
    def stream():
        while not stop.is_set(): answers.append(call(f"{server.url}/predict", body, 'application/json'))
    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads: t.start()
    time.sleep(1)
    version, rid = register(server.uri, server.model_dir/'model.onnx', 0.99)
    deadline = time.time() + 30
    while time.time() < deadline and call(f"{server.url}/model")[1]['version'] != version: time.sleep(0.2)
    time.sleep(1); stop.set()
    for t in threads: t.join()
    assert all(s == 200 for s, _ in answers), [a for s, a in answers if s != 200][:3]
    versions = [a['model']['version'] for _, a in answers]
    changes = [(a, b) for a, b in zip(versions, versions[1:]) if a != b]
    assert versions[0] == server.first[0] and versions[-1] == version, versions[::20]
    assert len(changes) <= len(threads), changes                 # each stream saw it change once, never back
    assert all(a['model']['run_id'] == (rid if a['model']['version'] == version else server.first[1])
               for _, a in answers)
    status, m = call(f"{server.url}/model")
    assert (m['version'], m['run_id'], m['test_accuracy']) == (version, rid, 0.99)
    assert f"now answers with version {version}" in server.log.read_text()


# The page, in a real browser: Debian's Chromium (Playwright's own browser download does not work here).
@pytest.fixture(scope='module')
def page(server):
    pw = pytest.importorskip('playwright.sync_api')
    if not os.access(CHROMIUM, os.X_OK): pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
            '--disable-background-networking', '--disable-component-update', '--disable-sync'])
        pg = b.new_page(viewport={'width': 400, 'height': 800}, is_mobile=True, has_touch=True)   # a phone's screen
        pg.goto(server.url + '/')
        pg.wait_for_function("document.getElementById('model').textContent.includes('v')")
        yield pg
        b.close()


def draw(pg, strokes):
    "Draw `strokes` (lists of (x, y) in 0..1 of the pad) with the mouse; wait for the answer to them."
    pg.click('#clear')
    box = pg.locator('#pad').bounding_box()
    at = lambda x, y: (box['x'] + x*box['width'], box['y'] + y*box['height'])
    for s in strokes:
        pg.mouse.move(*at(*s[0])); pg.mouse.down()
        for q in s[1:]: pg.mouse.move(*at(*q), steps=4)
        pg.mouse.up()
    # the pad is busy from the first stroke until the answer to the whole drawing is in
    pg.wait_for_function("document.getElementById('answer').getAttribute('aria-busy') === 'false'")
    return pg.locator('#answer').text_content(), pg.locator('#reason').text_content()


def bars(pg) -> list:
    return [float(v) for v in pg.locator('#bars .bar').evaluate_all("els => els.map(e => e.dataset.p)")]


def test_drawing_pad_in_a_browser(page, digits, tmp_path):
    import math
    one = [[(0.5, 0.15), (0.5, 0.85)]]
    zero = [[(0.5 + 0.22*math.sin(t/20*2*math.pi), 0.5 - 0.32*math.cos(t/20*2*math.pi)) for t in range(21)]]
    assert draw(page, one)[0] == '1'
    assert abs(sum(bars(page)) - 1) < 0.01
    assert draw(page, zero)[0] == '0'
    assert abs(sum(bars(page)) - 1) < 0.01
    assert f"{NAME} v" in page.locator('#model').text_content()
    out = ROOT/'test-reports'; out.mkdir(exist_ok=True)
    page.screenshot(path=str(out/'serve-page.png'), full_page=True)
    # a photographed digit, uploaded through the page
    x, y = digits
    f = tmp_path/'photo.jpg'; f.write_bytes(encoded(x[3], 'JPEG', size=160))
    page.set_input_files('#upload', str(f))
    page.wait_for_function(f"document.getElementById('answer').dataset.digit === '{y[3]}'", timeout=10_000)
    assert abs(sum(bars(page)) - 1) < 0.01
    # not sure is shown as such
    draw(page, [[(0.1, 0.1), (0.12, 0.12)], [(0.85, 0.85), (0.9, 0.9)], [(0.1, 0.9), (0.15, 0.85)]])
    assert page.locator('#answer').text_content() == '?' and 'not sure' in page.locator('#reason').text_content()


def test_the_pad_reads_drawings_and_refuses_non_digits(page):
    "Drawn as people draw: a 4 and a 5 in two strokes and a 7 with a crossbar are read; an X, a scribble are not."
    import math
    four = [[(0.36, 0.18), (0.3, 0.58), (0.72, 0.58)], [(0.6, 0.3), (0.6, 0.86)]]
    five = [[(0.4, 0.22), (0.37, 0.48), (0.5, 0.44), (0.62, 0.5), (0.67, 0.63), (0.62, 0.77), (0.5, 0.83),
             (0.36, 0.78)], [(0.45, 0.2), (0.7, 0.2)]]                       # the top bar apart from the rest
    seven = [[(0.3, 0.2), (0.7, 0.2), (0.45, 0.85)], [(0.4, 0.52), (0.66, 0.52)]]
    for strokes, want in ((four, '4'), (five, '5'), (seven, '7')):
        answer, reason = draw(page, strokes)
        assert (answer, reason.endswith('% sure')) == (want, True), (want, answer, reason)
    a = [[(0.3, 0.82), (0.5, 0.18), (0.7, 0.82)], [(0.38, 0.58), (0.62, 0.58)]]
    x = [[(0.28, 0.22), (0.72, 0.78)], [(0.72, 0.22), (0.28, 0.78)]]
    scribble = [[(0.5 + 0.3*math.sin(3*t), 0.5 + 0.3*math.sin(4*t + 0.5)) for t in np.linspace(0, 2*math.pi, 60)]]
    for name, strokes in (('X', x), ('scribble', scribble)):
        answer, reason = draw(page, strokes)
        assert answer == '?' and reason.startswith('not sure: low confidence'), (name, answer, reason)
    # The session's model is a 3-epoch one: its threshold (0.45) is near the A drawn in Chromium (0.47 as a 4), which
    # it refuses in Python's rendering (0.29). What holds for it: an A is never a confident digit, as it was before
    # the learned "not a digit" (a 4, 100% sure). The full recipe's rates on non-digits: bench/results/.
    answer, reason = draw(page, a)
    assert answer == '?' or int(reason.removesuffix('% sure')) < 60, ('A', answer, reason)
    out = ROOT/'test-reports'; out.mkdir(exist_ok=True)
    page.screenshot(path=str(out/'serve-page-not-sure.png'), full_page=True)


def test_the_pad_takes_a_correction(page, server):
    "Draw a 1, say it was a 7 with the pad's button: kept in the log and the feedback folder, counted in /metrics."
    assert draw(page, [[(0.5, 0.15), (0.5, 0.85)]])[0] == '1'
    page.wait_for_selector('#fix:not([hidden])')
    page.click('#digits button[data-fix="7"]')
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Thanks')")
    assert page.locator('#status').text_content() == 'Thanks: kept as 7' and page.locator('#fix').is_hidden()
    (png,) = (server.dir/'feedback'/'7').glob('*.png')
    assert Image.open(png).size == (28, 28)
    with urllib.request.urlopen(f"{server.url}/metrics") as r: m = r.read().decode()
    assert 'digit_corrections_total{answered="1",corrected="7"} 1.0' in m, m
    import sqlalchemy as sa
    with sa.create_engine(f"sqlite:///{server.dir/'predictions.db'}").connect() as c:
        n, fixed = c.execute(sa.text("select count(*), sum(corrected = 7) from predictions")).one()
    assert n >= 1 and fixed == 1


def test_the_servers_threshold_is_the_models(server, digits):
    "The server answers 'not sure' exactly as the client does with the same model file: the threshold stored in it."
    from digit_recognition.client import DigitPredictor
    from digit_recognition.outliers import families, make_outlier
    local = DigitPredictor.load(str(server.model_dir/'model.onnx'))
    status, m = call(f"{server.url}/model")
    assert (m['min_confidence'], m['threshold_from']) == (local.min_confidence, 'model'), m
    fams, x = families('test'), np.load(server.model_dir/'images.npy')
    images = [make_outlier(fams[i % len(fams)], (9, i), x) for i in range(20)] + [Image.fromarray(255 - a) for a in
                                                                                  digits[0]]
    files = []
    for i, im in enumerate(images):
        b = io.BytesIO(); im.save(b, 'JPEG' if im.format == 'JPEG' else 'PNG'); files.append(b.getvalue())
    status, a = call(f"{server.url}/predict/batch", *form(*((f"{i}", f, 'image/png') for i, f in enumerate(files)),
                                                         field='files'))
    assert status == 200, a
    want = local.predict(files)
    assert [(e['digit'], e['reason']) for e in a['results']] == [(r.digit, r.reason) for r in want]
    assert any(e['digit'] is None for e in a['results'][:20]) and all(e['digit'] is not None for e in a['results'][20:])


def register_broken(uri:str) -> str:
    "A registry version whose MLmodel is not a model description (a file that says `hi`), made the champion."
    import tempfile
    from mlflow import MlflowClient
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = c.create_run(c.get_experiment_by_name('serve').experiment_id)
    with tempfile.TemporaryDirectory() as d:
        (Path(d)/'MLmodel').write_text('hi\n'); c.log_artifact(run.info.run_id, f"{d}/MLmodel", 'model')
    c.set_terminated(run.info.run_id)
    mv = c.create_model_version(NAME, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    c.set_registered_model_alias(NAME, 'champion', mv.version)
    return str(mv.version)


def test_a_broken_version_does_not_stop_hot_reload(server, digits, run_cli):
    "The champion moves to a broken version: one line in the log, the old model answers; moved on, the server follows."
    before = call(f"{server.url}/model")[1]['version']
    bad = register_broken(server.uri)
    deadline = time.time() + 30
    while time.time() < deadline and f"models:/{NAME}/{bad}" not in server.log.read_text(): time.sleep(0.3)
    log = server.log.read_text()
    lines = [l for l in log.splitlines() if f"models:/{NAME}/{bad}" in l]
    assert len(lines) == 1 and f"still answering with version {before}" in lines[0], log[-3000:]
    assert 'Traceback' not in log
    x, y = digits
    status, a = call(f"{server.url}/predict", json.dumps({'pixels': x[0].tolist()}).encode(), 'application/json')
    assert (status, a['model']['version'], a['digit']) == (200, before, y[0])
    r = run_cli('digit-predict', server.model_dir/'digit.png', '--model', f"models:/{NAME}/{bad}",
                env={'MLFLOW_TRACKING_URI': server.uri})
    assert r.returncode == 1 and r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.startswith("error: model: ") and f"models:/{NAME}/{bad}" in r.stderr, r.stderr
    good, rid = register(server.uri, server.model_dir/'model.onnx', 0.98)       # and on to a good one
    deadline = time.time() + 30
    while time.time() < deadline and call(f"{server.url}/model")[1]['version'] != good: time.sleep(0.3)
    assert call(f"{server.url}/model")[1]['version'] == good


def test_a_heavy_request_does_not_hold_the_others(server):
    "Two 5000x5000 pictures being read: /health still answers in a fraction of a second; more pixels: 413 at once."
    big = io.BytesIO(); Image.new('L', (5000, 5000), 255).save(big, 'PNG'); big = big.getvalue()
    body, ctype = form(*((f"{i}.png", big, 'image/png') for i in range(2)), field='files')
    done, waits = [], []
    def heavy(): done.append(call(f"{server.url}/predict/batch", body, ctype))
    t = threading.Thread(target=heavy); t.start()
    t0 = time.time()
    while t.is_alive() and time.time() - t0 < 120:
        s = time.time(); assert call(f"{server.url}/health")[0] == 200; waits.append(time.time() - s)
        time.sleep(0.02)
    t.join(); took = time.time() - t0
    assert done[0][0] == 200 and [r['reason'] for r in done[0][1]['results']] == ['no ink']*2, done
    # on the event loop, one /health would have waited for the whole batch: here each waited a small part of it
    assert len(waits) >= 3 and max(waits) < max(0.1, took/4), (took, waits)
    body, ctype = form(*((f"{i}.png", big, 'image/png') for i in range(3)), field='files')
    status, a = call(f"{server.url}/predict/batch", body, ctype)
    assert status == 413 and 'pixels in all' in a['error'], a


def test_more_body_limits(server):
    "A chunked body over the limit is a 413 too; grey levels that overflow are out of range, not NaN."
    import http.client
    host, port = server.url.removeprefix('http://').split(':')
    b = uuid.uuid4().hex
    head = (f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            'Content-Type: image/png\r\n\r\n').encode()
    def chunks():
        yield head
        for _ in range(40): yield b'\0'*50_000                                  # 2 MB, with no Content-Length
        yield f'\r\n--{b}--\r\n'.encode()
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request('POST', '/predict', body=chunks(), headers={'Content-Type': f'multipart/form-data; boundary={b}'},
              encode_chunked=True)
    r = c.getresponse()
    assert r.status == 413 and 'request body' in json.loads(r.read())['error']
    status, a = call(f"{server.url}/predict", json.dumps({'pixels': [[1e308]*28]*28}).encode(), 'application/json')
    assert status == 400 and 'out of range' in a['error'], a


def test_a_registry_version_is_the_registrys_file(server, tmp_path, run_cli):
    "`models:/NAME/N` reads the registry's ONNX file, not a file of the same run left on this machine."
    version, rid = register(server.uri, server.model_dir/'model.onnx', 0.97, alias=None)
    (tmp_path/rid).mkdir(); (tmp_path/rid/'model.onnx').write_bytes(b'not the registered model')
    env = {'MLFLOW_TRACKING_URI': server.uri, 'DIGIT_PATHS_RESULTS_DIR': str(tmp_path)}
    r = run_cli('digit-predict', server.model_dir/'digit.png', '--model', f"models:/{NAME}/{version}", env=env)
    assert r.returncode == 0 and 'digit.png' in r.stdout, r.stderr[-2000:]
    r = run_cli('digit-predict', server.model_dir/'digit.png', '--model', f"runs:/{rid}/model", env=env)
    assert r.returncode == 1 and str(tmp_path/rid/'model.onnx') in r.stderr, r.stderr    # a run's own file: its own
