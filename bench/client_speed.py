"""The client's quality and speed on this machine, against its targets, on ONNX Runtime and (for comparison) PyTorch.

  photos        accuracy on test digits rendered as photos (dark ink on uneven light paper, larger canvas, off-centre,
                rotated, blurred, JPEG) next to the same model's accuracy on the clean test digits; the model's first
                choice, whether or not the answer is "not sure" (target: within 1 point)
  one image     after loading, one PNG photo file -> answer, `DigitPredictor.predict` (target: at most 1 ms; median of
                repeated calls), on ONNX Runtime and on PyTorch
  1,000 files   `digit-predict FOLDER` over 1,000 PNG files, the whole command from a fresh process (target: at most
                3 s; the median of --repeats runs, the first one listed too), with the model's ONNX file beside its
                checkpoint (ONNX Runtime) and without it (PyTorch)
  start-up      `import digit_recognition.client` in a fresh Python, and which heavy modules a prediction on ONNX
                Runtime imports (none of torch, MLflow, scipy, or the data / training / evaluation modules)
  client venv   a fresh virtual environment with `pip install 'digit-recognition[client]'` from the package index
                (no torch): its size on disk (target: at most 400 MB) and `digit-predict` over the 1,000 files there

    python bench/client_speed.py                          # the registry's champion (its run's checkpoint)
    python bench/client_speed.py --model training_results/<run id>/best.pt --photos 2000
    python bench/client_speed.py --quick                  # smoke run: 100 photos, 50 files, 20 calls, 1 repeat

The model's ONNX file is the one beside its checkpoint (`model.onnx`, as `digit-train` writes it); a checkpoint
without one is exported here (`model.export_onnx`) into a temporary run folder. The table, with date, machine and
versions, goes to bench/results/client_speed.json and .md (a --quick run's to client_speed-quick.*); its `figures`
are what the notebooks and README quote.
"""
import argparse, json, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np
from digit_recognition.client import DigitPredictor
from digit_recognition.images import render_photo
from digit_recognition.data import load_cleaned
from results import save, table

HEAVY = ('torch', 'torchvision', 'mlflow', 'scipy', 'matplotlib', 'pandas',
         'digit_recognition.data', 'digit_recognition.training', 'digit_recognition.evaluation')


def run_folders(source, d:Path) -> tuple:
    "Two run folders for the model in `source`, `(onnx, torch)`: its checkpoint with and without model.onnx beside it."
    from digit_recognition.sources import model_source
    from digit_recognition.mlmodel import load_model
    from digit_recognition.model import export_onnx
    ref = model_source(source or '')
    if not ref.checkpoint: sys.exit(f"{source}: no checkpoint on this machine (pass --model <run folder>/best.pt)")
    ck = Path(ref.checkpoint)
    onnx, pt = d/'onnx', d/'torch'
    for f in (onnx, pt): f.mkdir(); shutil.copy(ck, f/'best.pt')
    if (ck.parent/'model.onnx').is_file(): shutil.copy(ck.parent/'model.onnx', onnx/'model.onnx')
    else: export_onnx(load_model(ref), onnx/'model.onnx')
    return onnx, pt


def one_image_ms(pred, f, calls:int) -> float:
    "Median milliseconds of `pred.predict(f)` over `calls` calls, after one warm-up call."
    pred.predict(f); times = []
    for _ in range(calls):
        t = time.perf_counter(); pred.predict(f); times.append(time.perf_counter() - t)
    return 1000*statistics.median(times)


def command_seconds(folder:Path, model:Path, out:Path, repeats:int, bin_dir:Path=Path(sys.executable).parent) -> list:
    "Wall seconds of `digit-predict folder --model model` (the one in `bin_dir`), each a fresh process."
    cmd = [str(bin_dir/'digit-predict'), str(folder), '--model', str(model), '--format', 'csv',
           '--output', str(out)]
    walls = []
    for _ in range(repeats):
        t = time.perf_counter(); r = subprocess.run(cmd, capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        if r.returncode: sys.exit(f"digit-predict failed: {r.stderr.strip()[-500:]}")
    return walls


def client_venv(d:Path) -> tuple:
    "`(folder, MB on disk)` of a fresh venv with this project's wheel and its `[client]` extra from the package index."
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', d/'dist',
                    root], check=True, capture_output=True)
    whl = next((d/'dist').glob('digit_recognition-*.whl'))
    subprocess.run([sys.executable, '-m', 'venv', d/'venv'], check=True)
    subprocess.run([d/'venv'/'bin'/'python', '-m', 'pip', 'install', '-q', '--disable-pip-version-check',
                    f"{whl}[client]"], check=True, capture_output=True)
    mb = sum(f.stat().st_size for f in (d/'venv').rglob('*') if f.is_file() and not f.is_symlink())/2**20
    return d/'venv', mb


def startup(model:Path, image:Path) -> tuple:
    "`(seconds to import digit_recognition.client, heavy modules imported by a prediction)` in fresh processes."
    t = min(float(subprocess.run([sys.executable, '-c', "import time; t = time.perf_counter(); "
                                  "import digit_recognition.client; print(time.perf_counter() - t)"],
                                 capture_output=True, text=True, check=True).stdout) for _ in range(3))
    code = (f"import sys, json; from digit_recognition.client import DigitPredictor; "
            f"DigitPredictor.load({str(model)!r}).predict({str(image)!r}); "
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    heavy = json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                                      check=True).stdout)
    return t, heavy


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default=None, help="run id, URI or checkpoint (default: the champion)")
    ap.add_argument('--photos', type=int, default=2000, help="test digits to render as photos (default: %(default)s)")
    ap.add_argument('--files', type=int, default=1000, help="PNG files for digit-predict (default: %(default)s)")
    ap.add_argument('--calls', type=int, default=200, help="timed one-image calls (default: %(default)s)")
    ap.add_argument('--repeats', type=int, default=3, help="runs of each digit-predict command (default: %(default)s)")
    ap.add_argument('--client-venv', action=argparse.BooleanOptionalAction, default=True,
                    help="build a client-only venv from the package index and measure it (default: yes)")
    ap.add_argument('--quick', action='store_true', help="smoke run (100 photos, 50 files, 20 calls, 1 repeat) "
                    "written to bench/results/client_speed-quick.*")
    a = ap.parse_args()
    if a.quick: a.photos, a.files, a.calls, a.repeats = min(a.photos, 100), min(a.files, 50), min(a.calls, 20), 1
    x, y = load_cleaned(splits=('test',)).test
    x, y = x.squeeze(1).numpy(), y.numpy()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        onnx_dir, torch_dir = run_folders(a.model, d)
        from digit_recognition.training import load_checkpoint
        temperature = load_checkpoint(onnx_dir/'best.pt').get('temperature')
        t0 = time.perf_counter(); pred = DigitPredictor.load(str(onnx_dir/'best.pt')); load_s = time.perf_counter() - t0
        t0 = time.perf_counter(); pred_t = DigitPredictor.load(str(torch_dir/'best.pt'))
        load_t = time.perf_counter() - t0
        assert (pred.backend, pred_t.backend) == ('onnx', 'torch'), (pred.backend, pred_t.backend)
        n = min(a.photos, len(y))
        po, pt = pred.probabilities(x), pred_t.probabilities(x)
        agree, maxdiff = float((po.argmax(1) == pt.argmax(1)).mean()), float(np.abs(po - pt).max())
        clean = float((po[:n].argmax(1) == y[:n]).mean())
        photos = [render_photo(x[i], seed=i) for i in range(n)]
        got = pred.predict(photos)
        photo_acc = float(np.mean([r.ok and bool(r.top_k) and r.top_k[0][0] == t for r, t in zip(got, y[:n])]))
        unsure = float(np.mean([r.unsure for r in got]))
        rows = [('photo accuracy vs clean (ONNX Runtime)', f"{photo_acc:.4f} vs {clean:.4f} ({n} test digits)",
                 f"{100*(clean - photo_acc):+.2f} points", 'within 1 point',
                 'met' if clean - photo_acc <= 0.01 else 'NOT met'),
                ('ONNX Runtime vs PyTorch (test split)',
                 f"top-1 identical {agree:.2%}, largest probability difference {maxdiff:.1e}", '',
                 'top-1 identical, at most 1e-4', 'met' if agree == 1 and maxdiff <= 1e-4 else 'NOT met')]
        files = d/'files'; files.mkdir()
        for i in range(a.files): photos[i % n].convert('L').save(files/f"digit{i:04d}.png")
        one = files/'digit0000.png'
        ms, ms_t = one_image_ms(pred, one, a.calls), one_image_ms(pred_t, one, a.calls)
        rows += [('one image file -> answer, ONNX Runtime', f"{ms:.2f} ms (median of {a.calls})", '', 'at most 1 ms',
                  'met' if ms <= 1 else 'NOT met'),
                 ('one image file -> answer, PyTorch', f"{ms_t:.2f} ms (median of {a.calls})", '', '(comparison)', '')]
        walls = command_seconds(files, onnx_dir/'best.pt', d/'out.csv', a.repeats)
        walls_t = command_seconds(files, torch_dir/'best.pt', d/'out.csv', a.repeats)
        wall, wall_t = statistics.median(walls), statistics.median(walls_t)
        runs = lambda w: ', '.join(f"{s:.2f}" for s in w)
        rows += [(f'digit-predict over {a.files:,} PNG files, ONNX Runtime',
                  f"{wall:.2f} s (whole command; runs: {runs(walls)} s)", f"{a.files/wall:,.0f} files/s",
                  'at most 3 s', 'met' if wall <= 3 else 'NOT met'),
                 (f'digit-predict over {a.files:,} PNG files, PyTorch',
                  f"{wall_t:.2f} s (whole command; runs: {runs(walls_t)} s)", f"{a.files/wall_t:,.0f} files/s",
                  '(comparison)', '')]
        import_s, heavy = startup(onnx_dir/'best.pt', one)
        rows.append(('import digit_recognition.client (fresh Python)', f"{1000*import_s:.0f} ms",
                     f"heavy modules after a prediction: {', '.join(heavy) or 'none'}", 'no torch',
                     'met' if 'torch' not in heavy else 'NOT met'))
        venv_mb = walls_v = None
        if a.client_venv:
            venv_dir, venv_mb = client_venv(d/'client')
            walls_v = command_seconds(files, onnx_dir/'model.onnx', d/'out.csv', a.repeats, venv_dir/'bin')
            rows += [("client-only venv (`pip install 'digit-recognition[client]'`, no torch)", f"{venv_mb:.0f} MB",
                      '', 'at most 400 MB', 'met' if venv_mb <= 400 else 'NOT met'),
                     (f'digit-predict over {a.files:,} PNG files, in the client-only venv',
                      f"{statistics.median(walls_v):.2f} s (whole command; runs: {runs(walls_v)} s)",
                      f"{a.files/statistics.median(walls_v):,.0f} files/s", 'at most 3 s',
                      'met' if statistics.median(walls_v) <= 3 else 'NOT met')]
    source = a.model or 'the champion'
    print(f"model {source} (loaded in {load_s:.2f} s on ONNX Runtime, {load_t:.2f} s on PyTorch)\n")
    cols = ['measure', 'result', 'difference / rate', 'target', 'status']
    print(table(cols, rows))
    figs = dict(photo_accuracy=photo_acc, clean_accuracy=clean, photos=n, photos_unsure=round(unsure, 4),
                photo_drop_points=round(100*(clean - photo_acc), 2),   # clean minus photo accuracy, in points
                onnx_torch_top1_agreement=agree, onnx_torch_max_prob_diff=maxdiff,
                one_image_ms=round(ms, 3), one_image_ms_torch=round(ms_t, 3), one_image_calls=a.calls,
                load_seconds=round(load_s, 3), load_seconds_torch=round(load_t, 3),
                files=a.files, predict_folder_seconds=round(wall, 2), predict_folder_runs=[round(s, 2) for s in walls],
                predict_folder_seconds_torch=round(wall_t, 2), files_per_second=round(a.files/wall),
                import_client_ms=round(1000*import_s), heavy_modules_onnx=heavy,
                client_venv_mb=venv_mb and round(venv_mb),
                predict_folder_seconds_client_venv=walls_v and round(statistics.median(walls_v), 2),
                targets_met=sum(r[-1] == 'met' for r in rows), targets=sum(r[-1] != '' for r in rows))
    calibrated = f"calibrated, temperature {temperature:.3f}" if temperature else "no temperature: not calibrated"
    notes = [f"model {source} ({calibrated}): ONNX Runtime from the run folder's model.onnx, PyTorch from the same "
             "best.pt alone",
             f"Photos answered 'not sure' at the default [client] min_confidence: {unsure:.1%} (bench/unsure.py "
             "measures that side, with calibrated probabilities)."]
    figs['temperature'] = temperature
    save('client_speed-quick' if a.quick else 'client_speed', rows, cols, notes, figs)


if __name__ == '__main__':
    main()
