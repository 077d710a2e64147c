"`digit-data` reuses a dataset only when its inputs are the same, verifies a named source, and survives huge images."
import json, os, shutil, struct, zlib
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from test_data_cli import make_images, one_line_error, tmp_env


def stamps(*folders):
    "Name -> (size, mtime) of every file under `folders`: equal before and after means nothing was written."
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for d in folders for p in sorted(Path(d).rglob('*'))}


@pytest.mark.slow            # seven runs of digit-data
def test_image_folder_is_rebuilt_when_its_files_change(tmp_path, run_cli, mnist_dir):
    root, clean = tmp_path/'mine', tmp_path/'clean'
    x, y = make_images(root, mnist_dir)
    build = lambda: run_cli('digit-data', '--images', root, '--val-size', '0.2', env=tmp_env(tmp_path), check=0)
    manifest = lambda: json.loads((clean/'manifest.json').read_text())
    total = lambda m: sum(v['count'] for v in m['splits'].values())
    build(); m0 = manifest(); before = stamps(clean)
    build(); assert stamps(clean) == before                                        # unchanged: reused, untouched

    Image.fromarray(x[np.flatnonzero(y == 4)[20]]).save(root/'4'/'added.pgm')    # added
    build(); m1 = manifest()
    assert total(m1) == total(m0) + 1 and m1['version'] != m0['version']
    assert m1['inputs']['files'] == m0['inputs']['files'] + 1

    f = root/'4'/'added.pgm'; st = f.stat(); b = bytearray(f.read_bytes())       # same size and mtime, other pixels
    b[-28*28:] = np.rot90(np.frombuffer(bytes(b[-28*28:]), np.uint8).reshape(28, 28)).tobytes()
    f.write_bytes(bytes(b)); os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    build(); m2 = manifest()
    assert total(m2) == total(m1) and m2['version'] != m1['version']
    assert m2['inputs']['sha256'] != m1['inputs']['sha256'] and m2['inputs']['files'] == m1['inputs']['files']

    f.unlink()                                                                    # removed
    build(); m3 = manifest()
    assert total(m3) == total(m0) and m3['version'] == m0['version'] and m3['inputs'] == m0['inputs']
    before = stamps(clean); build(); assert stamps(clean) == before
    assert m0['inputs']['files'] == len([p for p in root.rglob('*') if p.is_file()]) == 58
    assert m0['inputs']['from'] == str(root.resolve())


@pytest.mark.slow            # five runs of digit-data, two of them building the whole MNIST
def test_named_source_is_verified_and_recorded(tmp_path, run_cli, mnist_dir):
    env, raw, clean = tmp_env(tmp_path, MNIST_DIR=None), tmp_path/'data'/'MNIST'/'raw', tmp_path/'clean'
    manifest = lambda: json.loads((clean/'manifest.json').read_text())
    run_cli('digit-data', '--source', mnist_dir, env=env, check=0)
    m0 = manifest(); before = stamps(raw, clean)

    one_line_error(run_cli('digit-data', '--source', tmp_path/'nowhere', env=env), 'nowhere: not found')
    assert stamps(raw, clean) == before
    bad = tmp_path/'bad'; shutil.copytree(mnist_dir, bad, ignore=shutil.ignore_patterns('*.json', '.*'))
    f = next(bad.glob('t10k-labels-idx1-ubyte*')); f.unlink()
    (bad/'t10k-labels-idx1-ubyte').write_bytes((raw/'t10k-labels-idx1-ubyte').read_bytes()[:-8])
    r = run_cli('digit-data', '--source', bad, env=env)
    one_line_error(r, 't10k-labels-idx1-ubyte', '10000 bytes (expected 10008)')
    assert stamps(raw, clean) == before

    r = run_cli('digit-data', '--source', mnist_dir, env=env, check=0)              # the same folder: verified, reused
    assert m0['version'] in r.stdout and stamps(raw, clean) == before

    other = tmp_path/'other'; other.mkdir()                                           # another good folder: rebuilt
    for n in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'):
        (other/n).symlink_to(raw/n)
    run_cli('digit-data', '--source', other, env=env, check=0)
    m1 = manifest()
    assert (clean/'manifest.json').stat().st_mtime_ns != before[str(clean/'manifest.json')]
    assert m0['inputs']['from'] == str(Path(mnist_dir).resolve()) and m1['inputs']['from'] == str(other.resolve())
    assert m1['version'] == m0['version'] and m1['inputs']['md5'] == m0['inputs']['md5']
    assert json.loads((raw/'verified.json').read_text())['source'] == str(other.resolve())


def big_png(path, w, h):
    "A valid 8-bit grey PNG of `w`x`h` black pixels, small on disk, written without holding the image in memory."
    chunk = lambda kind, data: struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    z, row = zlib.compressobj(6), bytes(w + 1)
    idat = b''.join(z.compress(row) for _ in range(h)) + z.flush()
    Path(path).write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 0, 0, 0, 0))
                           + chunk(b'IDAT', idat) + chunk(b'IEND', b''))


def test_oversized_images_are_rejected_by_name(tmp_path, run_cli, mnist_dir):
    root = tmp_path/'mine'; make_images(root, mnist_dir)
    big_png(root/'1'/'bomb.png', 14000, 14000); big_png(root/'7'/'huge.png', 10000, 10000)
    assert (root/'1'/'bomb.png').stat().st_size < 1_000_000
    r = run_cli('digit-data', '--images', root, '--val-size', '0.2', env=tmp_env(tmp_path), check=0)
    assert 'Traceback' not in r.stderr and 'Decompression' not in r.stderr, r.stderr
    m = json.loads((tmp_path/'clean'/'manifest.json').read_text())
    rejected = {o['file']: o['reason'] for o in m['report']['files']['rejected']}
    assert rejected == {'1/bomb.png': 'too_large', '7/huge.png': 'too_large', '4/empty.png': 'unreadable',
                        '7/notes.png': 'unreadable'}
    assert '1/bomb.png: too_large' in r.stdout and '7/huge.png: too_large' in r.stdout
    assert sum(v['count'] for v in m['splits'].values()) == 50 + 6 - 4                 # as without the two
