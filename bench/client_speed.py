"""The client's quality and speed on this machine, against its targets.

  photos        accuracy on test digits rendered as photos (dark ink on uneven light paper, larger canvas, off-centre,
                rotated, blurred, JPEG) next to the same model's accuracy on the clean test digits
                (target: within 1 point)
  one image     after loading, one image file -> answer (target: under 10 ms; median of repeated calls)
  1,000 files   `digit-predict FOLDER` over 1,000 PNG files, the whole command (target: under 10 s)

    python bench/client_speed.py                          # the registry's champion
    python bench/client_speed.py --model training_results/<run id>/best.pt --photos 2000
    python bench/client_speed.py --quick                  # smoke run: 100 photos, 50 files, 20 calls

The table, with date, machine and versions, goes to bench/results/client_speed.json and .md (a --quick run's to
client_speed-quick.*); its `figures` are what the notebooks and README quote.
"""
import argparse, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np
from digit_recognition.client import DigitPredictor
from digit_recognition.images import render_photo
from digit_recognition.data import load_cleaned
from results import save, table


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default=None, help="run id, URI or checkpoint (default: the champion)")
    ap.add_argument('--photos', type=int, default=2000, help="test digits to render as photos (default: %(default)s)")
    ap.add_argument('--files', type=int, default=1000, help="PNG files for digit-predict (default: %(default)s)")
    ap.add_argument('--calls', type=int, default=200, help="timed one-image calls (default: %(default)s)")
    ap.add_argument('--quick', action='store_true', help="smoke run (100 photos, 50 files, 20 calls) written to "
                    "bench/results/client_speed-quick.*")
    a = ap.parse_args()
    if a.quick: a.photos, a.files, a.calls = min(a.photos, 100), min(a.files, 50), min(a.calls, 20)
    x, y = load_cleaned(splits=('test',)).test
    x, y = x.squeeze(1).numpy(), y.numpy()
    t0 = time.perf_counter(); pred = DigitPredictor.load(a.model); load_s = time.perf_counter() - t0
    n = min(a.photos, len(y))
    clean = (pred.probabilities(x[:n]).argmax(1) == y[:n]).mean()
    photos = [render_photo(x[i], seed=i) for i in range(n)]
    got = pred.predict(photos)
    photo_acc = np.mean([r.ok and r.digit == t for r, t in zip(got, y[:n])])
    rows = [('photo accuracy vs clean', f"{photo_acc:.4f} vs {clean:.4f} ({n} test digits)",
             f"{100*(clean - photo_acc):+.2f} points", 'within 1 point',
             'met' if clean - photo_acc <= 0.01 else 'NOT met')]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for i in range(a.files): photos[i % n].convert('L').save(d/f"digit{i:04d}.png")
        one = d/'digit0000.png'
        pred.predict(one)
        times = []
        for _ in range(a.calls):
            t = time.perf_counter(); pred.predict(one); times.append(time.perf_counter() - t)
        ms = 1000*statistics.median(times)
        rows.append(('one image file -> answer', f"{ms:.2f} ms (median of {a.calls})", '', 'under 10 ms',
                     'met' if ms < 10 else 'NOT met'))
        cmd = [str(Path(sys.executable).parent/'digit-predict'), str(d), '--format', 'csv',
               '--output', str(d/'out.csv')]
        if a.model: cmd += ['--model', a.model]
        t = time.perf_counter(); r = subprocess.run(cmd, capture_output=True, text=True); wall = time.perf_counter() - t
        if r.returncode: sys.exit(f"digit-predict failed: {r.stderr.strip()[-500:]}")
        rows.append((f'digit-predict over {a.files:,} PNG files', f"{wall:.1f} s (whole command)",
                     f"{a.files/wall:,.0f} files/s", 'under 10 s', 'met' if wall < 10 else 'NOT met'))
    print(f"model {pred.source} (loaded in {load_s:.1f} s)\n")
    cols = ['measure', 'result', 'difference / rate', 'target', 'status']
    print(table(cols, rows))
    figs = dict(photo_accuracy=float(photo_acc), clean_accuracy=float(clean), photos=n,
                photo_drop_points=round(100*float(clean - photo_acc), 2),   # clean minus photo accuracy, in points
                one_image_ms=round(ms, 2), one_image_calls=a.calls, load_seconds=round(load_s, 2),
                files=a.files, predict_folder_seconds=round(wall, 2), files_per_second=round(a.files/wall),
                targets_met=sum(r[-1] == 'met' for r in rows), targets=len(rows))
    save('client_speed-quick' if a.quick else 'client_speed', rows, cols, [f"model {pred.source}"], figs)


if __name__ == '__main__':
    main()
