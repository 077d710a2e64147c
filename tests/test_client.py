"""The client with real files of each kind, non-digits answered "not sure", `digit-predict`'s formats and exit codes,
ONNX Runtime and PyTorch giving the same answers (and the ONNX path importing no torch), the drawing pad under Xvfb,
and `digit-predict --server` against a real `mlflow models serve`."""
import csv, io, json, math, os, re, shutil, signal, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from helpers import ROOT, BIN, free_port, refused_port, wait_for_http, as_in_a_terminal, sigint_state


@pytest.fixture(scope='module')
def model_dir(checkpoint_dir):
    "The session's checkpoint (tests/conftest.py): one epoch on 10,000 images, good enough to read digits."
    return checkpoint_dir


@pytest.fixture(scope='module')
def predictor(model_dir):
    "The checkpoint's predictor, on ONNX Runtime (model.onnx is beside it), without a confidence threshold."
    # the tiny model is not calibrated, and these tests are about reading digits: the threshold has tests of its own
    from digit_recognition.client import DigitPredictor
    p = DigitPredictor.load(str(model_dir/'best.pt'), min_confidence=0)
    assert p.backend == 'onnx'
    return p


@pytest.fixture(scope='module')
def test_split():
    from digit_recognition.data import load_cleaned
    x, y = load_cleaned(splits=('test',)).test
    return x.squeeze(1).numpy(), y.numpy()


def pick(test_split, predictor, digit):
    "A test image of `digit` that the model reads right with confidence, as a clean example to render."
    x, y = test_split
    idx = np.flatnonzero(y == digit)[:50]
    p = predictor.probabilities(x[idx])
    return x[idx[np.argmax(p[:, digit])]]


@pytest.fixture(scope='module')
def files(tmp_path_factory, test_split, predictor):
    "Real files of each kind, with the digit each should be read as or the error it should get."
    from digit_recognition.images import render_photo
    d = tmp_path_factory.mktemp('images')
    on_white = lambda a, size: Image.fromarray(255 - a).resize((size, size), Image.BILINEAR)
    expect = {}
    on_white(pick(test_split, predictor, 3), 112).save(d/'three.png'); expect['three.png'] = 3
    render_photo(pick(test_split, predictor, 7), seed=1).save(d/'seven_photo.jpg', quality=85)
    expect['seven_photo.jpg'] = 7
    ink = pick(test_split, predictor, 2)
    rgba = np.zeros((84, 84, 4), np.uint8)
    rgba[..., 3] = np.asarray(Image.fromarray(ink).resize((84, 84)))     # black ink, transparent paper
    Image.fromarray(rgba).save(d/'two_rgba.png'); expect['two_rgba.png'] = 2
    a16 = (np.asarray(on_white(pick(test_split, predictor, 5), 56), np.uint16)*257)
    Image.fromarray(a16).save(d/'five_16bit.png'); expect['five_16bit.png'] = 5
    on_white(pick(test_split, predictor, 0), 14).save(d/'zero_tiny.png'); expect['zero_tiny.png'] = 0
    Image.new('L', (7000, 7000), 255).save(d/'huge.png'); expect['huge.png'] = 'over the limit'
    (d/'notes.png').write_text('this is not an image\n'); expect['notes.png'] = 'not a readable image'
    (d/'empty.png').write_bytes(b''); expect['empty.png'] = 'not a readable image'
    Image.new('L', (100, 100), 230).save(d/'blank.png'); expect['blank.png'] = ('not sure', 'no ink')   # an answer
    frames = [Image.fromarray(255 - pick(test_split, predictor, k)) for k in (1, 4)]
    frames[0].save(d/'two_frames.gif', save_all=True, append_images=frames[1:])
    expect['two_frames.gif'] = 'has several frames'
    return d, expect


def test_each_kind_of_file(files, predictor):
    d, expect = files
    results = predictor.predict(sorted(d.iterdir()), top_k=3)
    got = {Path(r.source).name: r for r in results}
    assert set(got) == set(expect)
    for name, want in expect.items():
        r = got[name]
        if isinstance(want, int):
            assert r.ok and r.digit == want, f"{name}: {r}"
            assert 0 < r.probability <= 1 and len(r.top_k) == 3 and r.top_k[0] == (r.digit, r.probability)
        elif isinstance(want, tuple):
            assert r.ok and r.unsure and r.digit is None and r.reason == want[1], f"{name}: {r}"
        else:
            assert not r.ok and want in r.error and '\n' not in r.error, f"{name}: {r}"


def test_arrays_of_any_kind(predictor, test_split):
    x, y = test_split
    a = x[0]
    for variant in (a, a.astype(np.float32)/255, np.stack([a]*3, -1),
                    np.dstack([np.stack([a]*3, -1), np.full((28, 28), 255, np.uint8)]),
                    Image.fromarray(a), np.kron(a, np.ones((5, 5), np.uint8))):
        assert predictor.predict(variant).digit == y[0]


def test_photos_read_as_well_as_mnist(predictor, test_split):
    ("Test digits rendered as photos (dark ink on uneven paper, off-centre, rotated, blurred, JPEG) "
     "lose at most 1 point.")
    from digit_recognition.images import render_photo
    x, y = test_split
    n = 600
    clean = (predictor.probabilities(x[:n]).argmax(1) == y[:n]).mean()
    photos = [render_photo(x[i], seed=i) for i in range(n)]
    got = predictor.predict(photos)
    acc = np.mean([r.ok and r.digit == t for r, t in zip(got, y[:n])])
    assert acc >= clean - 0.01, (acc, clean)
    through = np.mean([r.top_k[0][0] == t for r, t in zip(predictor.predict(list(x[:n])), y[:n])])
    assert through == clean, (through, clean)    # MNIST digits come through to_mnist as they are


def run(*args, env=None, timeout=300):
    return subprocess.run([str(BIN/'digit-predict'), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_cli_formats_and_exit_codes(files, model_dir, tmp_path):
    d, expect = files
    ck = model_dir/'best.pt'
    good = [d/'three.png', d/'seven_photo.jpg']
    r = run(*good, '--model', ck, '--min-confidence', '0')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ['file', 'digit', 'confidence', 'top-k'] and len(lines) == 3
    assert re.search(r'three\.png\s+3\s+\d+\.\d%', r.stdout) and re.search(r'seven_photo\.jpg\s+7', r.stdout)
    r = run(d/'*.png', '--model', ck, '--format', 'json', '--top-k', '2', '--min-confidence', '0')
    assert r.returncode == 1 and r.stderr.strip().startswith('error: 3 of 8 inputs could not be read')
    rows = {Path(x['source']).name: x for x in json.loads(r.stdout)}
    assert (rows['three.png']['digit'] == 3 and len(rows['three.png']['top_k']) == 2
            and 'not a readable image' in rows['notes.png']['error'])
    blank = rows['blank.png']
    assert (blank['digit'], blank['reason'], blank['error']) == (None, 'no ink', None)
    out = tmp_path/'out.csv'
    r = run(d, '--model', ck, '--format', 'csv', '--output', out, '--save-annotated', tmp_path/'annotated',
            '--min-confidence', '0')
    assert r.returncode == 1 and r.stdout == ''
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == len(expect) and ({x['file'] for x in rows if x['error']}
                                         == {str(d/k) for k, v in expect.items() if isinstance(v, str)})
    assert {x['file']: (x['digit'], x['reason']) for x in rows if x['reason']} == {str(d/'blank.png'): ('', 'no ink')}
    ann = sorted(p.name for p in (tmp_path/'annotated').iterdir())
    assert 'three-3.png' in ann and 'blank-unsure.png' in ann
    assert len(ann) == sum(not isinstance(v, str) for v in expect.values())
    r = run(tmp_path/'nothing-here', '--model', ck)
    assert r.returncode == 1 and 'no such file' in r.stdout + r.stderr
    r = run(d/'three.png', '--model', tmp_path/'missing.pt')
    assert r.returncode == 1 and r.stderr.strip().startswith("error: model: ") and 'Traceback' not in r.stderr


def paper(rng, w=200, h=200):
    "A grey page lit from one side, with grain."
    xx = np.mgrid[0:h, 0:w][1]
    return Image.fromarray(np.clip(220 - 30*xx/w + rng.normal(0, 3, (h, w)), 0, 255).astype(np.uint8))


@pytest.fixture(scope='module')
def non_digits(tmp_path_factory):
    """Real files with no digit to read: {file name: the reason}. The ink rules answer a page with no ink or one
    covered in it; the rest (a dot, 11, =, a word) are the model's to refuse, with its own threshold: low confidence."""
    from PIL import ImageDraw, ImageFont
    d, rng, expect = tmp_path_factory.mktemp('non-digits'), np.random.default_rng(0), {}
    def put(name, im, reason): im.save(d/name); expect[name] = reason
    put('white.png', Image.new('L', (120, 90), 255), 'no ink')
    put('paper.jpg', paper(rng), 'no ink')
    put('noise.png', Image.fromarray(rng.integers(0, 256, (150, 150)).astype(np.uint8)), 'too much ink')
    xx = np.mgrid[0:150, 0:150][1]
    stripes = np.clip(140 + 60*np.sin(xx/3.0) + rng.normal(0, 10, (150, 150)), 0, 255).astype(np.uint8)
    put('stripes.jpg', Image.fromarray(stripes), 'too much ink')
    im = paper(rng); ImageDraw.Draw(im).ellipse([100, 100, 104, 104], fill=30); put('dot.png', im, 'low confidence')
    im = paper(rng); dr = ImageDraw.Draw(im)
    dr.line([60, 40, 60, 160], fill=30, width=10); dr.line([140, 40, 140, 160], fill=30, width=10)
    put('eleven.png', im, 'low confidence')
    im = paper(rng); dr = ImageDraw.Draw(im)
    dr.line([50, 80, 150, 80], fill=30, width=10); dr.line([50, 120, 150, 120], fill=30, width=10)
    put('equals.png', im, 'low confidence')
    im = paper(rng, 240, 140); ImageDraw.Draw(im).text((30, 10), 'ab', fill=20, font=ImageFont.load_default(size=90))
    put('word.jpg', im, 'low confidence')
    return d, expect


def test_non_digits_are_answered_not_sure(non_digits, files, model_dir, predictor):
    """The ink rules, the model's own threshold, and a probability under --min-confidence: `?` and the reason, no digit,
    exit status 0; the threshold is the model's unless one is set (flag or environment)."""
    d, expect = non_digits
    ck = model_dir/'best.pt'
    digits = {k: v for k, v in files[1].items() if isinstance(v, int)}
    r = run(d, *(files[0]/k for k in digits), '--model', ck, '--format', 'json')       # the model's own threshold
    assert r.returncode == 0 and r.stderr == '', r.stderr
    rows = {Path(x['source']).name: x for x in json.loads(r.stdout)}
    got = {k: (x['digit'], (x['reason'] or '').split(' (')[0]) for k, x in rows.items()}
    assert got == {**{k: (None, v) for k, v in expect.items()}, **{k: (v, '') for k, v in digits.items()}}, got
    assert rows['white.png']['top_k'] == [] and rows['noise.png']['top_k']               # the model ran / did not
    got = {Path(r.source).name: r for r in predictor.predict([files[0]/k for k in digits])}
    name = min(got, key=lambda k: got[k].probability)                # the digit the model is least sure of
    low, p = files[0]/name, got[name].probability
    assert got[name].digit == digits[name] and p < 1, got[name]
    above = f"{math.floor(p*1e4)/1e4 + 1e-4:g}"                      # a threshold just above its probability
    r = run(d, low, '--model', ck, '--min-confidence', above)
    assert r.returncode == 0 and r.stderr == '', r.stderr
    table = {Path(l.split()[0]).name: l for l in r.stdout.splitlines()[1:]}
    assert set(table) == set(expect) | {name}
    for k, reason in expect.items():
        assert re.fullmatch(rf'\S+\s+\?\s+.*not sure: {reason}.*', table[k]), table[k]
    assert re.search(rf'\s\?\s+\d+\.\d%\s+{digits[name]}:.*not sure: low confidence '
                     rf'\(\d\.\d\d < {re.escape(above)}\)$', table[name]), table[name]
    out = d.parent/'non-digits.csv'
    r = run(d, low, '--model', ck, '--format', 'csv', '--output', out, env={'DIGIT_CLIENT_MIN_CONFIDENCE': above})
    assert r.returncode == 0 and r.stdout == '', r.stderr                   # the setting, from the environment
    rows = {Path(x['file']).name: x for x in csv.DictReader(io.StringIO(out.read_text()))}
    assert {k: (x['digit'], x['reason'].split(' (')[0]) for k, x in rows.items()} == {
        **{k: ('', v) for k, v in expect.items()}, name: ('', 'low confidence')}
    assert rows[name]['reason'].endswith(f"< {above})") and rows[name]['top_k'].startswith(f"{digits[name]}:")
    r = run(low, '--model', ck, '--min-confidence', '0', '--format', 'csv')
    assert r.returncode == 0 and r.stdout.splitlines()[1].split(',')[1:2] == [str(digits[name])], r.stdout


def test_the_threshold_travels_with_the_model(model_dir, tmp_path):
    """The threshold fitted at training is in best.pt and in model.onnx's metadata: the same "not sure" answers on
    ONNX Runtime and on PyTorch; a checkpoint without one (trained before thresholds) keeps [client] min_confidence."""
    from digit_recognition.client import DigitPredictor
    from digit_recognition.config import Settings
    from digit_recognition.outliers import families, make_outlier
    from digit_recognition.training import load_checkpoint, save_checkpoint
    ck = load_checkpoint(model_dir/'best.pt')
    onnx, pt = DigitPredictor.load(str(model_dir/'best.pt')), DigitPredictor.load(str(model_dir/'best.pt'),
                                                                                  backend='torch')
    assert (onnx.backend, pt.backend) == ('onnx', 'torch')
    assert onnx.min_confidence == pt.min_confidence == ck['reject_threshold'] and onnx.threshold_from == 'model'
    fams = families('test')
    images = [make_outlier(fams[i % len(fams)], (5, i), np.load(model_dir/'images.npy')) for i in range(60)]
    images += list(np.load(model_dir/'images.npy'))
    a, b = onnx.predict(images), pt.predict(images)
    assert [(r.digit, r.reason) for r in a] == [(r.digit, r.reason) for r in b]
    assert 10 <= sum(r.unsure for r in a[:60]) and sum(r.unsure for r in a[60:]) <= 2, [str(r) for r in a]
    old = {k: v for k, v in ck.items() if k != 'reject_threshold'}
    save_checkpoint(tmp_path/'best.pt', **old)
    p = DigitPredictor.load(str(tmp_path/'best.pt'))
    assert (p.min_confidence, p.threshold_from) == (Settings().get('client', 'min_confidence'), 'defaults')


def test_onnx_and_torch_give_the_same_answers(model_dir, predictor, test_split):
    "The same checkpoint on ONNX Runtime and on PyTorch: top-1 identical, probabilities within 1e-4."
    from digit_recognition.client import DigitPredictor
    torch_predictor = DigitPredictor.load(str(model_dir/'best.pt'), backend='torch', min_confidence=0)
    assert torch_predictor.backend == 'torch'
    x = test_split[0][:2000]
    po, pt = predictor.probabilities(x), torch_predictor.probabilities(x)
    assert (po.argmax(1) == pt.argmax(1)).all() and np.abs(po - pt).max() <= 1e-4, np.abs(po - pt).max()


def test_the_onnx_path_imports_no_training_stack(model_dir):
    "The client on ONNX Runtime imports no torch, MLflow, or data / training / evaluation modules (they import torch)."
    code = f"""
import sys
from digit_recognition.client import DigitPredictor
r = DigitPredictor.load({str(model_dir/'best.pt')!r}).predict({str(model_dir/'digit.png')!r})
assert r.ok and r.top_k, r
heavy = {{'torch', 'torchvision', 'mlflow', 'matplotlib', 'pandas',
         'digit_recognition.data', 'digit_recognition.training', 'digit_recognition.evaluation',
         'digit_recognition.calibration', 'digit_recognition.mlmodel', 'digit_recognition.launch'}}
print(sorted(heavy & set(sys.modules)))
"""
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == '[]', r.stdout + r.stderr


def children(pid:int) -> list:
    "The ids of the processes whose parent is `pid` (Linux)."
    out = []
    for f in Path('/proc').glob('[0-9]*/stat'):
        try: ppid = int(f.read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError): continue
        if ppid == pid: out.append(int(f.parent.name))
    return out


def interrupt(p:subprocess.Popen, state='', timeout=60):
    "Ctrl-C as a terminal sends it: SIGINT to every process of `p`'s group. Returns (stdout, stderr) once `p` exits."
    os.killpg(p.pid, signal.SIGINT)
    try: out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); pytest.fail(f"no exit {timeout} s after SIGINT (signals before: {state})")
    time.sleep(0.5)
    try: os.killpg(p.pid, 0); left = True       # a process of the group (a worker) outlived the command
    except ProcessLookupError: left = False
    if left: os.killpg(p.pid, signal.SIGKILL)
    assert not left, 'processes of the command were left running after it exited'
    return out, err


def test_ctrl_c_stops_digit_predict(model_dir, test_split, tmp_path):
    "Ctrl-C in the middle of many files (read by worker processes): one line, `interrupted`, exit status 130."
    from digit_recognition.images import render_photo
    if not Path('/proc/self/stat').exists(): pytest.skip('needs /proc (Linux)')
    big = tmp_path/'big.png'
    render_photo(test_split[0][0], seed=1, size=2000).save(big)         # 2000x2000: each takes a while to read
    d = tmp_path/'many'; d.mkdir()
    for i in range(1000): os.link(big, d/f"{i:04}.png")                  # 1000 names for one file
    p = subprocess.Popen([str(BIN/'digit-predict'), d, '--model', model_dir/'best.pt'], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=as_in_a_terminal)
    # Interrupt once it is at work: all its worker processes have started (or, on one core, after its imports).
    workers = min(os.cpu_count() or 1, 8) if (os.cpu_count() or 1) > 1 else 0
    deadline = time.time() + (120 if workers else 5)
    while len(children(p.pid)) < max(workers, 1) and p.poll() is None and time.time() < deadline: time.sleep(0.05)
    time.sleep(1)
    assert p.poll() is None, 'digit-predict ended before it could be interrupted'
    state = sigint_state(p.pid)
    out, err = interrupt(p, state)
    assert p.returncode == 130, err[-3000:]
    assert err == 'interrupted\n' and out == ''


@pytest.fixture(scope='module')
def display():
    "An Xvfb display for the drawing pad."
    if not shutil.which('Xvfb'): pytest.skip('Xvfb is not installed (apt-get install xvfb)')
    n = 90 + os.getpid() % 50
    p = subprocess.Popen(['Xvfb', f':{n}', '-screen', '0', '1024x768x24', '-nolisten', 'tcp'],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while not Path(f'/tmp/.X11-unix/X{n}').exists():
        if time.time() > deadline or p.poll() is not None: pytest.fail('Xvfb did not start')
        time.sleep(0.1)
    yield f':{n}'
    p.terminate(); p.wait(10)


def test_drawing_pad(display, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('DISPLAY', display)
    import tkinter as tk
    from digit_recognition.client import DigitPredictor
    from digit_recognition.pad import DrawingPad
    predictor = DigitPredictor.load(str(model_dir/'best.pt'))                 # its own threshold, as digit-client
    root = tk.Tk()
    try:
        pad = DrawingPad(root, predictor, tmp_path); root.update()      # mapped on the screen, so it gets events
        c = pad.canvas
        assert root.title() == 'digit-client: draw a digit'
        c.event_generate('<ButtonPress-1>', x=140, y=40)
        for y in range(50, 241, 8): c.event_generate('<B1-Motion>', x=140, y=y)
        c.event_generate('<ButtonRelease-1>', x=140, y=240); root.update()
        assert pad.prediction.digit == 1 and root.title().startswith('digit-client: 1  (')
        assert pad.label.cget('text') == root.title().removeprefix('digit-client: ')
        f = pad.save()
        assert f.name.startswith('digit-1-') and Image.open(f).size == (280, 280)
        pad.clear(); root.update()
        assert pad.prediction is None and root.title() == 'digit-client: draw a digit'
        c.event_generate('<ButtonPress-1>', x=140, y=50)                  # a 0: a closed loop
        for t in np.linspace(0, 2*np.pi, 40):
            c.event_generate('<B1-Motion>', x=int(140 + 60*np.sin(t)), y=int(140 - 90*np.cos(t)))
        c.event_generate('<ButtonRelease-1>', x=140, y=50); root.update()
        assert pad.prediction.digit == 0, root.title()
        pad.clear(); root.update()
        for x in (80, 200):                                               # two strokes apart: 11, not one digit
            c.event_generate('<ButtonPress-1>', x=x, y=60)
            for y in range(70, 221, 10): c.event_generate('<B1-Motion>', x=x, y=y)
            c.event_generate('<ButtonRelease-1>', x=x, y=220)
        root.update()
        assert root.title().startswith('digit-client: not sure: low confidence'), root.title()
        assert pad.prediction.digit is None and pad.save().name.startswith('digit-unsure-')
    finally: root.destroy()


def wait_for_window(p, env, seconds=60) -> list:
    "The X window ids of `digit-client` process `p` once its window is up (fails with its stderr if it exits first)."
    deadline, wid = time.time() + seconds, ''
    while not wid and time.time() < deadline and p.poll() is None:
        wid = subprocess.run(['xdotool', 'search', '--name', 'digit-client'], env=env, capture_output=True,
                             text=True).stdout.split()
        time.sleep(0.3)
    assert wid, p.stderr.read() if p.poll() is not None else 'no window'
    return wid


def test_digit_client_starts_a_window(display, model_dir, tmp_path):
    if not shutil.which('xdotool'): pytest.skip('xdotool is not installed')
    env = {**os.environ, 'DISPLAY': display}
    p = subprocess.Popen([str(BIN/'digit-client'), '--model', str(model_dir/'best.pt'), '--save-dir', str(tmp_path)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wid = wait_for_window(p, env)
        name = subprocess.run(['xdotool', 'getwindowname', wid[-1]], env=env, capture_output=True,
                              text=True).stdout.strip()
        assert name == 'digit-client: draw a digit'
    finally:
        p.terminate(); p.wait(10)
    r = subprocess.run([str(BIN/'digit-client')], cwd=ROOT, env={**os.environ, 'DISPLAY': ':9999'},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().startswith('error: no display for the drawing pad')


def test_ctrl_c_closes_the_drawing_pad(display, model_dir, tmp_path):
    "Ctrl-C in the terminal of `digit-client` while its window waits for the mouse: one line, exit status 130."
    if not shutil.which('xdotool'): pytest.skip('xdotool is not installed')
    env = {**os.environ, 'DISPLAY': display}
    p = subprocess.Popen([str(BIN/'digit-client'), '--model', model_dir/'best.pt', '--save-dir', tmp_path], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=as_in_a_terminal)
    try:
        wait_for_window(p, env)
        time.sleep(1)                                                    # idle: Tk is waiting for events
        out, err = interrupt(p, timeout=20)
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130 and err == 'interrupted\n', err[-3000:]


@pytest.fixture(scope='module')
def served(model_dir, tmp_path_factory):
    "The checkpoint's model logged, registered as champion in a sqlite store, and served by `mlflow models serve`."
    d = tmp_path_factory.mktemp('serve')
    uri = f"sqlite:///{d/'mlflow.db'}"
    code = f"""
import mlflow, torch
from digit_recognition.mlmodel import log_model
from digit_recognition.data import load_cleaned
mlflow.set_tracking_uri({uri!r})
mlflow.create_experiment('serve', artifact_location={(d/'artifacts').as_uri()!r})   # not the project's mlruns/
mlflow.set_experiment('serve')
with mlflow.start_run() as run:
    info = log_model({str(model_dir/'best.pt')!r}, load_cleaned(splits=('val',)).val[0][:1])
v = mlflow.register_model(info.model_uri, 'digit-recognizer')
mlflow.MlflowClient().set_registered_model_alias('digit-recognizer', 'champion', v.version)
"""
    env = {**os.environ, 'MLFLOW_TRACKING_URI': uri,
           'PATH': f"{BIN}:{os.environ['PATH']}"}                       # serve starts uvicorn from PATH
    for k in ('MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD', 'MLFLOW_REGISTRY_URI'): env.pop(k, None)
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, check=True, capture_output=True)
    port = free_port()
    log = open(d/'serve.log', 'w')
    p = subprocess.Popen([str(BIN/'mlflow'), 'models', 'serve', '-m', 'models:/digit-recognizer@champion',
                          '--env-manager', 'local', '-h', '127.0.0.1', '-p', str(port)],
                         cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/ping", p, d/'serve.log')
    yield url, env
    p.terminate()
    try: p.wait(20)
    except subprocess.TimeoutExpired: p.kill()


@pytest.mark.slow            # a real `mlflow models serve`: a model server, as the slow tier has
def test_predict_through_a_served_model(served, files, predictor):
    url, env = served
    d, expect = files
    good = [d/k for k, v in expect.items() if isinstance(v, int)]
    r = run(*good, '--server', url, '--format', 'json', '--min-confidence', '0', env=env)
    assert r.returncode == 0, r.stderr
    remote = {Path(x['source']).name: x for x in json.loads(r.stdout)}
    local = {Path(x.source).name: x for x in predictor.predict(good)}
    for k in local:
        assert remote[k]['digit'] == local[k].digit == expect[k]
        assert remote[k]['probability'] == pytest.approx(local[k].probability, abs=1e-4)
    # The default model is the registry's champion.
    r = run(d/'three.png', '--format', 'csv', '--min-confidence', '0', env=env)
    assert r.returncode == 0 and r.stdout.splitlines()[1].split(',')[1] == '3', r.stderr
    with refused_port() as port: r = run(d/'three.png', '--server', f"http://127.0.0.1:{port}")
    assert r.returncode == 1 and 'cannot be reached' in r.stderr and 'Traceback' not in r.stderr


def invoke(url:str, images) -> tuple:
    "POST `images` as {'inputs': ...} to a served model's /invocations: (HTTP status, the JSON answer)."
    body = json.dumps({'inputs': np.asarray(images).tolist()}).encode()     # NaN and inf as JSON's usual NaN, Infinity
    req = urllib.request.Request(f"{url}/invocations", body, {'Content-Type': 'application/json'})
    try:
        with urllib.request.urlopen(req, timeout=60) as r: return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e: return e.code, json.loads(e.read())


@pytest.mark.slow            # the same real model server
def test_served_model_checks_its_input(served, test_split):
    "The served model answers 400 and a JSON error, not 200 and NaN or nonsense, for values that are not 0..1 images."
    url, _ = served
    x, y = test_split
    good = x[:8].astype(np.float32)/255
    status, out = invoke(url, good)
    assert status == 200, out
    p = np.asarray(out['predictions'])
    assert p.shape == (8, 10) and np.allclose(p.sum(1), 1, atol=1e-4) and (p.argmax(1) == y[:8]).mean() >= 0.75
    for bad, why in [(np.where(np.eye(28, dtype=bool), np.nan, good[0])[None], 'NaN or infinite'),
                     (np.where(np.eye(28, dtype=bool), np.inf, good[0])[None], 'NaN or infinite'),
                     (np.where(np.eye(28, dtype=bool), -np.inf, good[0])[None], 'NaN or infinite'),
                     (x[:8].astype(np.float32), 'divide 0-255 images by 255')]:
        status, out = invoke(url, bad)
        assert status == 400 and out.get('error_code') == 'INVALID_PARAMETER_VALUE', (why, status, out)
        assert 'Error: input: ' in out['message'] and why in out['message'], out     # MLflow's wrapping of our check
