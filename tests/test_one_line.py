"""Bad input, one clear line: each case a hostile hour found ending in a traceback (or a hang, or silence), run as a
user runs it, with the command's exit status and its whole stderr checked."""
import os, re, socket, time
import numpy as np
import pytest
from PIL import Image


def one_line(r, *words):
    "The command failed with exit status 1 and a single line on stderr, `error: ...`, holding each of `words`."
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in r.stderr, r.stderr[-3000:]
    for w in words: assert w in lines[0], (w, lines[0])
    return lines[0]


PROFILE = {'PYTHONPROFILEIMPORTTIME': '1'}      # a command run with it lists every module it imports on stderr

def imported(r) -> set:
    "The top-level packages command `r` (run with PROFILE) imported; their lines are taken out of `r.stderr`."
    mods = {m.group(1).split('.')[0] for m in re.finditer(r'^import time:.*\|\s+(\S+)$', r.stderr, re.M)}
    r.stderr = '\n'.join(l for l in r.stderr.splitlines() if not l.startswith('import time:'))
    assert 'digit_recognition' in mods and 'numpy' in mods, sorted(mods)              # the profile is real
    return mods


@pytest.fixture(scope='module')
def image(tmp_path_factory):
    f = tmp_path_factory.mktemp('img')/'seven.png'
    a = np.full((60, 60), 255, np.uint8); a[10:14, 15:45] = 0; a[14:50, 38:42] = 0
    Image.fromarray(a).save(f)
    return f


@pytest.fixture(scope='module')
def shape_onnx(tmp_path_factory):
    "An ONNX model that takes 1 x 3 x 64 x 64 images: not a digit reader."
    import torch
    f = tmp_path_factory.mktemp('onnx')/'shape.onnx'
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4*62*62, 10)).eval()
    torch.onnx.export(net, (torch.zeros(1, 3, 64, 64),), str(f), input_names=['images'], dynamo=False)
    return f


def test_output_paths_that_cannot_be_written(run_cli, image, checkpoint_dir, tmp_path):
    "Any OSError on an output path: one line naming it and the reason; nothing half-written."
    model = checkpoint_dir/'model.onnx'
    one_line(run_cli('digit-predict', image, '--model', model, '--output', '/proc/nope/out.csv'),
             '--output /proc/nope/out.csv: No such file or directory')
    one_line(run_cli('digit-predict', image, '--model', model, '--output', image/'out.csv'), str(image))
    one_line(run_cli('digit-predict', image, '--model', model, '--output', tmp_path), str(tmp_path))
    one_line(run_cli('digit-predict', image, '--model', model, '--save-annotated', image), str(image))
    one_line(run_cli('digit-predict', image, '--model', model, '--save-annotated', '/proc/x'), '/proc/x')
    assert sorted(p.name for p in tmp_path.iterdir()) == []                            # no temporary file left


def test_a_model_of_the_wrong_shape(run_cli, image, shape_onnx):
    "Refused when it is loaded, by digit-predict and by digit-serve (which would answer every request with a 500)."
    for cmd in (('digit-predict', image), ('digit-serve',)):
        one_line(run_cli(*cmd, '--model', shape_onnx), str(shape_onnx), 'has input 1 x 3 x 64 x 64',
                 'expected N x 28 x 28')


def test_settings_that_cannot_work(run_cli, image, tmp_path):
    "A .env that is not UTF-8, settings from the environment out of range, DIGIT_HOME that is not a folder."
    home = tmp_path/'home'; home.mkdir(); (home/'.env').write_bytes(b'A=\x00\xff\xfe\n')
    one_line(run_cli('digit-predict', image, env={'DIGIT_HOME': str(home)}), '.env: not UTF-8 text')
    one_line(run_cli('digit-serve', env={'DIGIT_SERVE_PORT': '99999'}), 'port: 99999 from env DIGIT_SERVE_PORT')
    one_line(run_cli('digit-serve', env={'DIGIT_SERVE_MAX_BYTES': '-5'}), 'max_bytes: -5', '1 or more')
    one_line(run_cli('digit-data', env={'DIGIT_HOME': str(image)}), f"DIGIT_HOME: {image} is not a folder")
    one_line(run_cli('digit-data', env={'DIGIT_HOME': '/proc/self'}), '/proc/')


@pytest.mark.slow            # six commands, each importing torch, MLflow and Optuna before it checks: a minute
def test_a_search_space_checked_before_any_trial(run_cli, tmp_path):
    "Each mistake is one line before any trial starts: nothing is written (no tracking store, no study, no run)."
    env = {'DIGIT_PATHS_RESULTS_DIR': str(tmp_path), 'MLFLOW_TRACKING_URI': f"sqlite:///{tmp_path/'m.db'}"}
    one_line(run_cli('digit-tune', '--space', 'batch_size = choice 0,-5', '--trials', '1', env=env),
             'batch_size: 0 (expected at least 1)')
    one_line(run_cli('digit-tune', '--space', 'lr = int 1 2', env=env), 'lr is a parameter of type float')
    r = run_cli('digit-tune', '--jobs', '0', env={**env, **PROFILE})
    assert not imported(r) & {'mlflow', 'torch', 'matplotlib', 'papermill'}    # MLflow where a study starts
    one_line(r, '--jobs: expected at least 1')
    one_line(run_cli('digit-tune', '--timeout', '-1', env=env), '--timeout')
    one_line(run_cli('digit-tune', '--try', 'lr=fast', env=env), '--try lr=fast')
    one_line(run_cli('digit-sweep', '--grid', 'lr=0.01', '--jobs', '0', env=env), '--jobs: expected at least 1')
    one_line(run_cli('digit-tune', '--epochs', '0', env=env), 'epochs: 0 (expected at least 1)')   # a fixed knob
    assert list(tmp_path.iterdir()) == []                     # the results folder and the store's: nothing written


def test_a_rendezvous_port_in_use(run_cli, tmp_path):
    "Another program listens on the rendezvous port: one line at once, not minutes of silence."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); s.listen(); port = s.getsockname()[1]
        t0 = time.time()
        env = {'DIGIT_PATHS_RESULTS_DIR': str(tmp_path), 'MLFLOW_TRACKING_URI': f"sqlite:///{tmp_path/'m.db'}"}
        r = run_cli('digit-train', '--nproc-per-node', '2', '--rdzv-endpoint', f'127.0.0.1:{port}', '--epochs', '1',
                    env=env, timeout=120)
    one_line(r, f'rdzv_endpoint: 127.0.0.1:{port} is in use by another program')
    assert time.time() - t0 < 60


def test_files_that_are_not_regular_files(run_cli, checkpoint_dir, tmp_path):
    "A FIFO or a device is not opened (it may never end): 'not a regular file'; a newline in a name stays one row."
    fifo = tmp_path/'pipe.png'; os.mkfifo(fifo)
    odd = tmp_path/'two\nlines.png'
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(odd)
    r = run_cli('digit-predict', fifo, '/dev/zero', odd, '--model', checkpoint_dir/'model.onnx', timeout=60)
    rows = r.stdout.strip().splitlines()
    assert r.returncode == 1 and len(rows) == 4, r.stdout                  # a header and one row per input
    assert re.search(r'pipe\.png +error: not a regular file$', rows[1]), rows[1]
    assert re.search(r'^/dev/zero +error: not a regular file$', rows[2]), rows[2]
    assert rows[3].startswith(str(tmp_path/'two\\nlines.png')) and 'no ink' in rows[3]


def test_a_folder_of_one_digit_warns(run_cli, tmp_path):
    root = tmp_path/'imgs'
    (root/'3').mkdir(parents=True)
    for i in range(12):                  # twelve different blots (shifted strokes would be one once centred)
        a = np.zeros((28, 28), np.uint8)
        a[4:24, 10:18] = (np.random.default_rng(i).random((20, 8)) > 0.4)*255
        Image.fromarray(a).save(root/'3'/f'{i}.png')
    r = run_cli('digit-data', '--images', root, '--val-size', '0.34',
                env={'DIGIT_PATHS_CLEANED_DIR': str(tmp_path/'clean'), 'DIGIT_DATA_OUTLIERS': '0',
                     'DIGIT_DATA_VIEWS': '0'})
    assert r.returncode == 0, r.stderr
    assert 'warning: image folder' in r.stderr and 'only the digit 3' in r.stderr and 'Traceback' not in r.stderr


def test_a_training_flag_is_checked_before_pytorch_mlflow_and_papermill(run_cli, tmp_path):
    """`digit-train` checks its flags and the dataset before it imports PyTorch, MLflow or papermill (seconds of CPU
    each): a value that cannot work is one line at once. The notebook's kernel imports what training needs."""
    r = run_cli('digit-train', '--epochs', '0', env=PROFILE)
    mods = imported(r)
    assert not mods & {'torch', 'mlflow', 'papermill', 'matplotlib'}, sorted(mods & {'torch', 'mlflow', 'papermill'})
    one_line(r, 'epochs: 0 (expected at least 1)')
    r = run_cli('digit-train', '--epochs', '1', env={'DIGIT_PATHS_CLEANED_DIR': str(tmp_path), **PROFILE})
    assert 'manifest.json: not found' in r.stderr and not re.search(r'\|\s+torch$', r.stderr, re.M)
