"""How well the client says "not a digit": non-digits answered `unsure`, and photographed digits wrongly answered so.

A test set made here, offline and seeded, as real image files read through the client's normal path
(`DigitPredictor.predict` on file paths, as `digit-predict` does):
  non-digits   blank and near-blank pages, noise, lines, circles, rectangles, letters and symbols (PIL fonts),
               photos of textures (gradients, noise and blur, paper-like), each as a photo of paper (PNG or JPEG)
  digits       MNIST test digits photographed with `images.render_photo` (JPEG)
and prints, per kind, the share answered `unsure` and why (targets: at least 80% of the non-digits; at most 1% of
the digits), and the same two shares for a range of `[client] min_confidence` values, to choose its default.

    python bench/unsure.py                                  # the champion; 100 of each kind, 2,000 digits
    python bench/unsure.py --model training_results/<run id>/best.pt
    python bench/unsure.py --quick                          # smoke run: 20 of each kind, 200 digits

The table, with date, machine and versions, goes to bench/results/unsure.json and .md (a --quick run's to
unsure-quick.*); its `figures` are what the notebooks and README quote.
"""
import argparse, tempfile
from collections import Counter
from pathlib import Path
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

KINDS = ('blank', 'near-blank', 'noise', 'lines', 'circles', 'rectangles', 'letters', 'symbols', 'textures')
# Letters that are the very glyphs of digits (O and o for 0; I, l and | for 1) are left out: any reader says 0 or 1.
LETTERS = 'ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz'
SYMBOLS = '+-=×÷%&@#$?!*/\\()[]{}<>~^§¶€£¥±∞≠≈√πΩ→←↑↓♥♦♣♠☺✓✗'
FONTS = sorted(Path('/usr/share/fonts').rglob('*.ttf'))


def _font(rng, size:int):
    "A font of `size` pixels: one of the system's TrueType fonts if there are any, else Pillow's own."
    if FONTS and rng.random() < 0.8:
        f = FONTS[rng.integers(len(FONTS))]
        try: return ImageFont.truetype(str(f), size)
        except OSError: pass
    return ImageFont.load_default(size=size)


def photograph(ink:np.ndarray,   # the ink, 0..1 (1 = full ink), the size of the page
               rng,              # a numpy Generator
               paper_only:np.ndarray|None=None,  # a page to use instead of plain paper (textures), 0..255
              ) -> Image.Image:
    "A grey photo of dark `ink` on paper lit from one side, with grain and a little blur, as `render_photo` makes."
    h, w = ink.shape
    yy, xx = np.mgrid[0:h, 0:w]/max(h, w)
    a = rng.uniform(0, 2*np.pi)
    paper = (rng.uniform(170, 215) + rng.uniform(25, 45)*(np.cos(a)*xx + np.sin(a)*yy)
             + rng.normal(0, 4, (h, w))) if paper_only is None else paper_only
    photo = paper*(1 - rng.uniform(0.7, 0.85)*ink)
    im = Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8))
    return im.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.2)))


def _canvas(rng):
    "An empty page (PIL 'L', 0 = no ink), drawn at twice the size for smooth edges; its final side."
    side = int(rng.integers(120, 321))
    return Image.new('L', (2*side, 2*side), 0), side


def _done(im:Image.Image, side:int) -> np.ndarray:
    return np.asarray(im.resize((side, side), Image.BOX), np.float32)/255


def _shape(kind:str, rng) -> np.ndarray:
    "The ink of one non-digit of `kind` (lines, circles, rectangles, letters, symbols) on a page."
    im, side = _canvas(rng); d = ImageDraw.Draw(im); S = 2*side
    cx, cy = rng.uniform(0.3, 0.7, 2)*S
    size = rng.uniform(0.25, 0.8)*S
    width = max(2, int(rng.uniform(0.02, 0.08)*S))
    if kind == 'lines':
        for _ in range(1 if rng.random() < 0.7 else int(rng.integers(2, 5))):
            a = rng.uniform(0, np.pi); dx, dy = np.cos(a)*size/2, np.sin(a)*size/2
            d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=255, width=width)
            cx, cy = cx + rng.uniform(-0.15, 0.15)*S, cy + rng.uniform(-0.15, 0.15)*S
    elif kind == 'circles':
        rx, ry = size/2, size/2*rng.uniform(0.6, 1.4)
        filled = rng.random() < 0.3
        d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255 if filled else None, outline=255, width=width)
    elif kind == 'rectangles':
        w2, h2 = size/2, size/2*rng.uniform(0.4, 1.6)
        filled = rng.random() < 0.3
        layer = Image.new('L', im.size, 0)
        ImageDraw.Draw(layer).rectangle([cx - w2, cy - h2, cx + w2, cy + h2], fill=255 if filled else None,
                                        outline=255, width=width)
        im = layer.rotate(rng.uniform(-30, 30), resample=Image.BILINEAR, center=(cx, cy))
    else:
        chars = LETTERS if kind == 'letters' else SYMBOLS
        n = 1 if rng.random() < 0.75 else int(rng.integers(2, 4))
        text = ''.join(chars[rng.integers(len(chars))] for _ in range(n))
        font = _font(rng, max(12, int(size/max(1, 0.6*n))))
        x0, y0, x1, y1 = d.textbbox((0, 0), text, font=font)
        layer = Image.new('L', im.size, 0)
        ImageDraw.Draw(layer).text((cx - (x0 + x1)/2, cy - (y0 + y1)/2), text, fill=255, font=font)
        im = layer.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, center=(cx, cy))
    return _done(im, side)


def _field(rng, h:int, w:int, cells:int) -> np.ndarray:
    "Smooth random values, about `cells` blobs across: random numbers on a coarse grid, enlarged smoothly."
    g = rng.random((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(g).resize((w, h), Image.BICUBIC))


def _page(kind:str, rng) -> Image.Image:
    "One page of `kind` (blank, near-blank, noise, textures), as a photo."
    side = int(rng.integers(120, 321)); ink = np.zeros((side, side), np.float32)
    if kind == 'blank':
        if rng.random() < 0.3: return Image.new('L', (side, side), int(rng.integers(200, 256)))   # a clean scan
        return photograph(ink, rng)
    if kind == 'near-blank':
        yy, xx = np.mgrid[0:side, 0:side]
        choice = rng.integers(3)
        for _ in range(1 if choice < 2 else int(rng.integers(2, 6))):      # a speck, a dot, or a few specks
            y, x = rng.uniform(0.1, 0.9, 2)*side; r = rng.uniform(0.5, 0.015*side + 1)
            ink = np.maximum(ink, ((yy - y)**2 + (xx - x)**2 <= r*r)*rng.uniform(0.3, 1))
        if choice == 1:                                                    # or a faint smudge
            ink = np.maximum(ink, 0.12*_field(rng, side, side, 3))
        return photograph(ink, rng)
    if kind == 'noise':
        how = rng.integers(3)
        if how == 0: a = rng.normal(128, rng.uniform(30, 90), (side, side))                      # Gaussian
        elif how == 1: a = np.where(rng.random((side, side)) < rng.uniform(0.05, 0.5), 0, 255)   # salt and pepper
        else: a = rng.integers(0, 256, (side, side, 3))                                          # colour noise
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    # textures: paper, wood, fabric or stone: low-frequency shading, grain, stripes, blur, sometimes in colour
    base = rng.uniform(90, 200) + rng.uniform(20, 60)*(_field(rng, side, side, int(rng.integers(2, 6))) - 0.5)
    if rng.random() < 0.5:                                                 # stripes: wood grain, fabric
        yy, xx = np.mgrid[0:side, 0:side]/side; a = rng.uniform(0, np.pi)
        u = np.cos(a)*xx + np.sin(a)*yy + 0.05*_field(rng, side, side, 4)
        base += rng.uniform(8, 30)*np.sin(2*np.pi*rng.uniform(6, 25)*u)
    base += rng.uniform(5, 25)*(_field(rng, side, side, int(rng.integers(15, 40))) - 0.5)
    base += rng.normal(0, rng.uniform(2, 10), (side, side))
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2)))
    if rng.random() < 0.4:                                                 # a tinted photo
        tint = rng.uniform(0.7, 1.1, 3)
        im = Image.fromarray(np.clip(np.asarray(im, np.float32)[..., None]*tint, 0, 255).astype(np.uint8))
    return im


def non_digits(n:int=100,    # images of each kind
               seed:int=0,   # seeds the whole set: the same arguments give the same images
              ) -> list:
    "`[(kind, PIL image)]`: `n` non-digits of each of `KINDS`, made offline."
    out = []
    for k, kind in enumerate(KINDS):
        rng = np.random.default_rng([seed, k])
        for _ in range(n):
            if kind in ('lines', 'circles', 'rectangles', 'letters', 'symbols'):
                im = photograph(_shape(kind, rng), rng)
            else: im = _page(kind, rng)
            out.append((kind, im))
    return out


def write_files(folder:Path, items:list, seed:int=0) -> list:
    "Save `[(kind, PIL image)]` in `folder` as PNG or JPEG (chosen by `seed`); `[(kind, path)]`."
    rng = np.random.default_rng(seed); out = []
    for i, (kind, im) in enumerate(items):
        jpeg = rng.random() < 0.5
        f = folder/f"{kind}-{i:05d}.{'jpg' if jpeg else 'png'}"
        im.save(f, quality=int(rng.integers(70, 95))) if jpeg else im.save(f)
        out.append((kind, f))
    return out


REASONS = ('no ink', 'too little ink', 'too much ink', 'several separate shapes', 'low confidence')
THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)


class Tempered:
    "A model's probabilities at temperature `t`: softmax(log(p)/t), the same as dividing its logits by `t`."
    def __init__(self, model, t:float): self.model, self.t = model, t
    def __call__(self, x):
        from digit_recognition.client import run_model
        z = np.log(np.clip(run_model(self.model, x), 1e-12, 1))/self.t
        e = np.exp(z - z.max(1, keepdims=True))
        return e/e.sum(1, keepdims=True)


def fit_temperature(p:np.ndarray, y:np.ndarray) -> float:
    "The temperature that minimises the NLL of softmax(log(p)/t) on labels `y` (a fine grid on log t)."
    z = np.log(np.clip(p, 1e-12, 1))
    def nll(t):
        a = z/t; a = a - a.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(a).sum(1)) - a[np.arange(len(y)), y]))
    ts = np.exp(np.linspace(np.log(0.05), np.log(5), 801))
    return float(ts[np.argmin([nll(t) for t in ts])])


def reason_of(r, threshold:float) -> str|None:
    "Why prediction `r` (made without a threshold) is not sure at `threshold`: its ink's reason, low confidence, None."
    if r.reason: return r.reason
    return 'low confidence' if r.probability is not None and r.probability < threshold else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default=None,
                    help="run id, URI, checkpoint, run folder or .onnx file (default: the champion)")
    ap.add_argument('--per-kind', type=int, default=100, help="non-digits of each kind (default: %(default)s)")
    ap.add_argument('--digits', type=int, default=2000, help="photographed test digits (default: %(default)s)")
    ap.add_argument('--seed', type=int, default=0, help="seeds the non-digits (default: %(default)s)")
    ap.add_argument('--no-calibrate', action='store_true',
                    help="use the model's probabilities as they are (default: a temperature fitted on the validation "
                         "split on top of the model's own; 1.0 when the model is calibrated already)")
    ap.add_argument('--quick', action='store_true', help="smoke run (20 of each kind, 200 digits) written to "
                    "bench/results/unsure-quick.*")
    a = ap.parse_args()
    if a.quick: a.per_kind, a.digits = min(a.per_kind, 20), min(a.digits, 200)
    from digit_recognition.client import DigitPredictor
    from digit_recognition.config import Settings
    from digit_recognition.data import load_cleaned
    from digit_recognition.images import render_photo, MIN_INK_EXTENT, MAX_INK_SHARE, MAX_SECOND_PIECE
    from results import save, table

    default = float(Settings().get('client', 'min_confidence'))
    pred = DigitPredictor.load(a.model, min_confidence=0)        # the ink's reasons only: thresholds are applied here
    backend = pred.backend
    data = load_cleaned(splits=('val', 'test'))
    xv, yv = data.val[0].squeeze(1).numpy(), data.val[1].numpy()
    t = 1.0 if a.no_calibrate else fit_temperature(pred.probabilities(xv), yv)
    if t != 1.0: pred.model = Tempered(pred.model, t)
    x, y = data.test[0].squeeze(1).numpy(), data.test[1].numpy()
    n = min(a.digits, len(y))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        files = write_files(d, non_digits(a.per_kind, a.seed), a.seed)
        for i in range(n):
            render_photo(x[i], seed=i).save(d/f"digit-{i:05d}.jpg", quality=90)
            files.append(('digits', d/f"digit-{i:05d}.jpg"))
        got = pred.predict([f for _, f in files], top_k=3)
    bad = [r for r in got if not r.ok]
    if bad: raise SystemExit(f"{len(bad)} files could not be read, e.g. {bad[0]}")
    kinds = [k for k, _ in files]
    by_kind = {k: [r for kk, r in zip(kinds, got) if kk == k] for k in (*KINDS, 'digits')}
    nd = [r for k, r in zip(kinds, got) if k != 'digits']
    digits = by_kind['digits']

    def row(name, rs, target='', met=''):
        c = Counter(reason_of(r, default) for r in rs)
        share = 1 - c[None]/len(rs)
        return (name, len(rs), f"{share:.1%}", *(c[k] for k in REASONS), target, met), share
    rows = [row(k, by_kind[k])[0] for k in KINDS]
    r_nd, share_nd = row('all non-digits', nd, 'at least 80%')
    r_d, share_d = row('photographed digits', digits, 'at most 1%')
    rows += [r_nd[:-1] + ('met' if share_nd >= 0.8 else 'NOT met',),
             r_d[:-1] + ('met' if share_d <= 0.01 else 'NOT met',)]
    misread = np.mean([r.top_k[0][0] != t for r, t in zip(digits, y[:n])])
    answered = [(r, t) for r, t in zip(digits, y[:n]) if reason_of(r, default) is None]
    acc_answered = np.mean([r.top_k[0][0] == t for r, t in answered])
    sweep = []
    for th in THRESHOLDS:
        u_nd = np.mean([reason_of(r, th) is not None for r in nd])
        u_d = np.mean([reason_of(r, th) is not None for r in digits])
        sweep.append((f"{th:g}", f"{u_nd:.1%}", f"{u_d:.2%}", 'yes' if u_nd >= 0.8 and u_d <= 0.01 else 'no'))
    ok = [th for th in THRESHOLDS if np.mean([reason_of(r, th) is not None for r in digits]) <= 0.01]

    cols = ['inputs', 'images', 'answered not sure', *REASONS, 'target', 'status']
    sweep_cols = ['min_confidence', 'non-digits not sure', 'digits not sure', 'both targets']
    print(f"model {pred.source} ({backend}); temperature {t:.3f}; [client] min_confidence {default:g}\n")
    print(table(cols, rows)); print(); print(table(sweep_cols, sweep))
    notes = [f"model {pred.source} ({backend}); temperature fitted on the validation split on top of the "
             f"model's own: {t:.3f} (1 = calibrated already); [client] min_confidence = {default:g}; ink thresholds: "
             f"MIN_INK_EXTENT {MIN_INK_EXTENT}, MAX_INK_SHARE {MAX_INK_SHARE}, MAX_SECOND_PIECE {MAX_SECOND_PIECE}",
             f"Photographed digits: misread by the model {misread:.2%}; accuracy on those answered with a digit "
             f"{acc_answered:.2%}. The counts per reason are images; an image has one reason (the ink's first).",
             "The same test set for other values of min_confidence:", table(sweep_cols, sweep)]
    figs = dict(min_confidence=default, temperature=round(t, 4), non_digits=len(nd), digits=n,
                non_digits_unsure=round(float(share_nd), 4), digits_unsure=round(float(share_d), 4),
                per_kind={k: round(1 - Counter(reason_of(r, default) for r in by_kind[k])[None]/len(by_kind[k]), 4)
                          for k in KINDS},
                sweep={th: [round(float(np.mean([reason_of(r, th) is not None for r in nd])), 4),
                            round(float(np.mean([reason_of(r, th) is not None for r in digits])), 4)]
                       for th in THRESHOLDS},
                highest_min_confidence_within_1pct=max(ok) if ok else None,
                digit_accuracy_answered=round(float(acc_answered), 4), digits_misread=round(float(misread), 4),
                targets_met=int(share_nd >= 0.8) + int(share_d <= 0.01), targets=2)
    save('unsure-quick' if a.quick else 'unsure', rows, cols, notes, figs)


if __name__ == '__main__':
    main()
