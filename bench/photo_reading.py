"""Reading photographs: is it the reader or the model that keeps photographed digits below issue 20's 99.3%?

The reader (`images.to_mnist`) turns a photo into an MNIST-style 28x28: background and lighting removed, the ink
cropped, fitted into 20x20, centred by its centre of mass. This benchmark reads photographs of digits with the reader
as it is and with a few other choices of the same steps, and sets each beside the model's accuracy on the same digits
as MNIST gives them (no photo): what the reader loses is the gap between the two.

Which images do what (MNIST's test split and the test families play no part here):
  validation  MNIST's validation digits (the cleaned `val` split), each photographed `--shots` times
              (`images.render_photo`, seeds from 200,000 up; saved as a JPEG of quality 90 as bench/unsure.py saves
              its photos). The accuracy of each set of photographs (one of each digit) is shown too: how far it
              moves from one set to the next is how far apart two readers must be to be told apart.

Variants (each a choice inside the reader's steps):
  subpixel centre   the centre of mass moved to the middle by a bilinear shift, not by whole pixels
  faint edges kept  the crop is the bounding box of the ink with its faint edges (the ink mask grown by 2 pixels),
                    not of the ink above a quarter of the darkest
  box 19 / box 21   the digit fitted into 19x19 or 21x21 instead of MNIST's 20x20

    python bench/photo_reading.py --model training_results/<run id>/best.pt
    python bench/photo_reading.py               # trains the default recipe first (minutes)

The table goes to bench/results/photo_reading.json and .md.
"""
import argparse, io, tempfile, time
import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from digit_recognition import images as I
from digit_recognition.data import load_cleaned
from digit_recognition.training import load_checkpoint
from digit_recognition.calibration import probabilities_from_checkpoint
from results import save, table
from trained import MODEL_HELP, checkpoint

COLS = ['reader', 'val photographed acc', 'gap to the digits themselves', 'wrong only as a photo',
        'right only as a photo', 'each set of photographs', 'ms per photo']


def fit_subpixel(crop:np.ndarray, box:int=20, size:int=28) -> np.ndarray:
    "`images.fit_and_centre`, but the centre of mass moved to the middle by a bilinear (subpixel) shift."
    out = I.fit_and_centre(crop, box, size)            # fitted and centred to the pixel; the rest of the way:
    cy, cx = ndimage.center_of_mass(out)
    return np.clip(ndimage.shift(out, (size/2 - cy, size/2 - cx), order=1), 0, 255)


def crop_faint_edges(ink:np.ndarray, min_part:float=0.1) -> np.ndarray:
    "`images.crop_to_ink`, but the box holds the faint edges too: the kept pieces' mask grown by 2 pixels."
    mask = ink > 0.25*ink.max()                        # the pieces of ink, as `crop_to_ink` finds them
    lab, n = ndimage.label(mask)                       # (4-neighbours, as there)
    sizes = np.bincount(lab[mask], ink[mask], n + 1)
    keep = ndimage.binary_dilation((sizes >= min_part*sizes.max())[lab], iterations=2) & (ink > 0)
    rows, cols = np.flatnonzero(keep.any(1)), np.flatnonzero(keep.any(0))
    return (ink*keep)[rows[0]:rows[-1]+1, cols[0]:cols[-1]+1]


def reader(crop=None, fit=None):
    "A photo reader made of the reader's own steps, with `crop` and `fit` in place of its own."
    crop, fit = crop or I.crop_to_ink, fit or I.fit_and_centre
    return lambda g: fit(crop(I.remove_background(I.ink_on_dark(g)))).round().astype(np.uint8)


READERS = {'as today (images.to_mnist)': None,
           'subpixel centre': reader(fit=fit_subpixel),
           'faint edges kept': reader(crop=crop_faint_edges),
           'faint edges kept, subpixel centre': reader(crop=crop_faint_edges, fit=fit_subpixel),
           'box 19': reader(fit=lambda c: I.fit_and_centre(c, box=19)),
           'box 21': reader(fit=lambda c: I.fit_and_centre(c, box=21))}


def photo(digit:np.ndarray, seed:int) -> np.ndarray:
    "`digit` photographed (`render_photo`), saved as a JPEG of quality 90 and read back: the grey levels."
    buf = io.BytesIO()
    I.render_photo(digit, seed=seed).save(buf, 'JPEG', quality=90)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert('L'), np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='', help=MODEL_HELP)
    ap.add_argument('--shots', type=int, default=3, help="photographs of each digit (default: %(default)s)")
    a = ap.parse_args()
    data = load_cleaned(splits=('train', 'val'))
    with tempfile.TemporaryDirectory() as d:
        ck = checkpoint(a.model, data, d)        # (answers only: the first choice needs no calibration)
        state, net = load_checkpoint(ck), probabilities_from_checkpoint(ck)
    x, y = data.val[0].squeeze(1).numpy(), data.val[1].numpy()
    grays = [photo(digit, 200_000 + s*len(x) + i) for s in range(a.shots) for i, digit in enumerate(x)]
    x, y = np.tile(x, (a.shots, 1, 1)), np.tile(y, a.shots)         # the digits, once per photograph
    def answers(images):
        with torch.no_grad(): return net(torch.from_numpy(np.stack(images).astype(np.float32)/255)).argmax(1).numpy()
    clean = answers(list(x)) == y
    rows, figs = [('the digits themselves (no photo)', f"{clean.mean():.4f}", '', '', '', '', '')], {}
    for name, read in READERS.items():
        t0 = time.perf_counter()
        read_ = read or (lambda g: I.to_mnist(g))
        right = answers([read_(g) for g in grays]) == y
        ms = (time.perf_counter() - t0)/len(grays)*1000
        worse, better = int((clean & ~right).sum()), int((~clean & right).sum())
        sets = right.reshape(a.shots, -1).mean(1)                      # one photograph of each digit per set
        rows.append((name, f"{right.mean():.4f}", f"{right.mean() - clean.mean():+.4f}", worse, better,
                     ' '.join(f"{v:.4f}" for v in sets), f"{ms:.1f}"))
        figs[name] = dict(accuracy=round(float(right.mean()), 4), wrong_only_as_photo=worse,
                          right_only_as_photo=better, per_set=[round(float(v), 4) for v in sets])
    k = state['params']
    notes = [f"{len(y)//a.shots:,} validation digits, each photographed {a.shots} times; model: a {k['model']} "
             f"of width {k['width']}, {k['epochs']} epochs, seed {k['seed']}, dataset {state['dataset_version']} "
             f"(temperature {net.temperature:.3f}); the first choice counts, whatever the 'not sure' threshold says.",
             "A reader that lost nothing would read the photographs as well as the digits themselves; the counts say "
             "how many digits a photograph turned from right to wrong and from wrong to right."]
    figs['digits_themselves'] = round(float(clean.mean()), 4)
    print(table(COLS, rows)); print(); print('\n\n'.join(notes))
    save('photo_reading', rows, COLS, notes, figs)


if __name__ == '__main__':
    main()
