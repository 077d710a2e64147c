"""One preprocessing: the same image files give byte-identical 28x28 arrays through `digit-data --images` (training
on your own images) and through `DigitPredictor` (digit-predict, the drawing pad, the server)."""
import gzip, json
from pathlib import Path
import numpy as np
from PIL import Image
from test_data_cli import tmp_env


def mnist_test_digits(mnist_dir, n=200):
    "The first `n` MNIST test digits and labels, from the IDX files (gzipped or not)."
    raw = Path(mnist_dir)
    def read(name):
        return (raw/name).read_bytes() if (raw/name).exists() else gzip.decompress((raw/f'{name}.gz').read_bytes())
    x = np.frombuffer(read('t10k-images-idx3-ubyte'), np.uint8, offset=16).reshape(-1, 28, 28)
    y = np.frombuffer(read('t10k-labels-idx1-ubyte'), np.uint8, offset=8)
    return x[:n], y[:n]


def others(y) -> dict:
    "For each digit, the index of its first example after the 30 saved as they are."
    return {c: 30 + int(np.flatnonzero(y[30:] == c)[0]) for c in range(10)}


def own_images(root, mnist_dir) -> dict:
    "A folder of one's own digits, ROOT/<label>/*: each kind of file a user may have. Returns {file: label}."
    from digit_recognition.images import render_photo
    x, y = mnist_test_digits(mnist_dir)
    first = others(y)
    on_white = lambda a, size: Image.fromarray(255 - a).resize((size, size), Image.BILINEAR)
    files = {}
    def put(label, name, save):
        (root/str(label)).mkdir(parents=True, exist_ok=True)
        save(root/str(label)/name); files[f'{label}/{name}'] = label
    for i in range(30):                                                       # MNIST digits saved as PNG
        put(int(y[i]), f'mnist{i}.png', lambda f, i=i: Image.fromarray(x[i]).save(f))
    put(3, 'on_white.png', lambda f: on_white(x[first[3]], 112).save(f))     # dark ink on white, larger
    put(7, 'photo.jpg', lambda f: render_photo(x[first[7]], seed=1).save(f, quality=85))   # like a phone's JPEG
    ink = np.asarray(Image.fromarray(x[first[2]]).resize((84, 84)))
    rgba = np.zeros((84, 84, 4), np.uint8); rgba[..., 3] = ink               # black ink on transparent paper
    put(2, 'drawing_rgba.png', lambda f: Image.fromarray(rgba).save(f))
    deep = np.asarray(on_white(x[first[5]], 56), np.uint16)*257              # 16-bit grey
    put(5, 'deep_16bit.png', lambda f: Image.fromarray(deep).save(f))
    put(4, 'mnist_16bit.png', lambda f: Image.fromarray(x[first[4]].astype(np.uint16)*257).save(f))
    put(9, 'inverted.png', lambda f: Image.fromarray(255 - x[first[9]]).save(f))    # MNIST, dark on light
    exif = Image.Exif(); exif[0x0112] = 8                                     # stored on its side, tagged to turn
    put(1, 'sideways.jpg', lambda f: on_white(x[first[1]], 90).rotate(-90).save(f, exif=exif, quality=90))
    return files


def test_digit_data_and_the_predictor_see_the_same_arrays(tmp_path, run_cli, mnist_dir):
    from digit_recognition import client, folders, images
    from digit_recognition.data import load_cleaned
    assert client.to_mnist_checked is images.to_mnist_checked and folders.read_digit_image is images.read_digit_image
    root, out = tmp_path/'mine', tmp_path/'clean'
    files = own_images(root, mnist_dir)
    run_cli('digit-data', '--images', root, '--out', out, env=tmp_env(tmp_path), check=0)

    # what training reads: every row of every split, and the file it came from (the manifest lists them)
    m = json.loads((out/'manifest.json').read_text())
    d = load_cleaned(out)
    trained = {}
    for k, (x, y) in d.splits.items():
        names = m['splits'][k]['files']
        assert len(names) == len(y) == m['splits'][k]['count']
        for f, a, label in zip(names, x.squeeze(1).numpy(), y.numpy()): trained[f] = (a, int(label))
    assert set(trained) == set(files), set(files) ^ set(trained)             # every file made it, none twice

    # what a model is given at prediction time: DigitPredictor's own batch, caught before the model
    class Spy(client.DigitPredictor):
        def probabilities(self, x):
            self.seen = x.copy(); return np.full((len(x), 10), 0.1, np.float32)
    spy = Spy(model=None)
    names = sorted(files)
    results = spy.predict([root/f for f in names])
    assert all(r.ok for r in results), [str(r) for r in results if not r.ok]
    assert spy.seen.shape == (len(names), 28, 28) and spy.seen.dtype == np.uint8
    for f, seen in zip(names, spy.seen):
        a, label = trained[f]
        assert label == files[f]
        assert a.dtype == seen.dtype and a.tobytes() == seen.tobytes(), f    # byte for byte
        assert a.tobytes() == images.to_mnist(root/f).tobytes()

    # MNIST digits come through as they are, whichever way they were saved; the others are brought to MNIST's form
    x, y = mnist_test_digits(mnist_dir)
    for i in range(30): assert (trained[f'{y[i]}/mnist{i}.png'][0] == x[i]).all()
    first = others(y)
    assert (trained['4/mnist_16bit.png'][0] == x[first[4]]).all()
    assert (trained['9/inverted.png'][0] == x[first[9]]).all()
    for f in ('3/on_white.png', '7/photo.jpg', '2/drawing_rgba.png', '5/deep_16bit.png', '1/sideways.jpg'):
        assert images.is_mnist_form(trained[f][0]), f
    side = trained['1/sideways.jpg'][0]; rows, cols = np.flatnonzero(side.any(1)), np.flatnonzero(side.any(0))
    assert rows[-1] - rows[0] > 2*(cols[-1] - cols[0]), 'the 1 was read lying down'    # upright: tall and thin
    notes = m['report']['files']
    assert (notes['converted_to_grayscale'], notes['inverted'], notes['resized']) == (1, 6, 5), notes
