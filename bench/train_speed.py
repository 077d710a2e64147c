"""Training speed on a CPU: our fast recipe and `digit-train`'s defaults against the classic PyTorch MNIST example.

Runs, on the full cleaned MNIST and on this machine, in one process run:
  fast         our default model on a one-epoch schedule (in-memory tensors, batch-level work only), per seed
  reference    the PyTorch examples' MNIST recipe: conv32-conv64-maxpool-dropout-fc128-fc10, Adadelta lr 1.0,
               StepLR gamma 0.7, batch 64, per-sample torchvision transforms through a DataLoader
  digit-train  the `digit-train` command with its default settings (wall time of the whole command), per seed
and prints a table: test accuracy after each epoch, training seconds to reach 99.0% test accuracy, images/s. The fast
recipe and digit-train run once per seed (--seeds, default three): the targets are on the mean over the seeds.

    python bench/train_speed.py                       # all three (about 10 minutes on 2 cores)
    python bench/train_speed.py --parts fast,reference --reference-epochs 14 --no-stop-at-target
    python bench/train_speed.py --quick               # smoke run: fast only, 5,000 images (under a minute)

The table, with date, machine and versions, goes to bench/results/train_speed.json and .md (a --quick run's to
train_speed-quick.*); its `figures` are what the notebooks and README quote.
"""
import argparse, json, re, subprocess, sys, tempfile, time
from pathlib import Path
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets, transforms
from digit_recognition.config import Settings, get_device, seed_everything
from digit_recognition.data import load_cleaned, prepare_data
from digit_recognition.model import get_model
from digit_recognition.training import TrainParams, fit, evaluate, model_from_checkpoint
from results import save, table

TARGET = 0.99


def run_fast(data, device, max_train_samples=0, seed=42):
    "Our recipe: the default CNN, one epoch of one-cycle AdamW on in-memory tensors."
    p = TrainParams(model='cnn', width=16, epochs=1, batch_size=128, lr=0.01, optimizer='adamw', schedule='onecycle',
                    weight_decay=5e-4, label_smoothing=0.1, augment=False, seed=seed, device=device,
                    max_train_samples=max_train_samples, patience=0, outlier_share=0, ema=0)   # digits only
    seed_everything(seed); m = get_model('cnn', width=p.width); rows, t = [], 0.0
    def on_epoch(metrics, epoch):
        nonlocal t
        t += metrics['epoch_seconds']
        rows.append((epoch, t, evaluate(m, *data.test)['accuracy'], metrics['images_per_second']))
    with tempfile.TemporaryDirectory() as d: fit(m, data, d, p, on_epoch=on_epoch)
    return rows


class ReferenceNet(nn.Module):
    "The network of the PyTorch examples' mnist/main.py."
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)
    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = self.dropout2(F.relu(self.fc1(torch.flatten(self.dropout1(x), 1))))
        return F.log_softmax(self.fc2(x), dim=1)


def run_reference(device, epochs, stop_at_target, max_train_samples=0):
    "The PyTorch examples' recipe, as written there (on the first `max_train_samples` images if set)."
    seed_everything(1)
    dev = get_device(device)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    root = Settings().path('paths', 'data_dir')
    train = datasets.MNIST(root, train=True, transform=tf)
    if max_train_samples: train = torch.utils.data.Subset(train, range(max_train_samples))
    train = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    test = torch.utils.data.DataLoader(datasets.MNIST(root, train=False, transform=tf), batch_size=1000)
    model = ReferenceNet().to(dev)
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    rows, t = [], 0.0
    for epoch in range(1, epochs + 1):
        model.train(); t0 = time.time()
        for x, y in train:
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad(); loss = F.nll_loss(model(x), y); loss.backward(); opt.step()
        secs = time.time() - t0; t += secs; sched.step()
        model.eval(); correct = 0
        with torch.no_grad():
            for x, y in test: correct += (model(x.to(dev)).argmax(1) == y.to(dev)).sum().item()
        rows.append((epoch, t, correct/len(test.dataset), len(train.dataset)/secs))
        print(f"  reference epoch {epoch}: {t:.0f} s, test accuracy {rows[-1][2]:.4f}", flush=True)
        if stop_at_target and rows[-1][2] >= TARGET: break
    return rows


def run_digit_train(data, max_train_samples=0, seed=42):
    "`digit-train` with its defaults: wall time of the whole command and the test accuracy of its best checkpoint."
    cmd = [str(Path(sys.executable).parent/'digit-train'), '--quiet', '--run-name', 'bench-defaults',
           '--seed', str(seed)]
    if max_train_samples: cmd += ['--max-train-samples', str(max_train_samples)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode: sys.exit(f"digit-train failed: {r.stderr.strip().splitlines()[-1]}")
    ck = re.search(r'checkpoint\s+(\S+)', r.stdout).group(1)
    res = json.loads((Path(ck).parent/'result.json').read_text())
    acc = evaluate(model_from_checkpoint(ck), *data.test)['accuracy']
    return wall, acc, res['epochs_run']


def seconds_to_target(rows):
    return next((t for _, t, acc, _ in rows if acc >= TARGET), None)


def to_target(rows):
    t = seconds_to_target(rows)
    return 'not reached' if t is None else f"{t:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--parts', default=None,
                    help="which to run, comma-separated (default: fast,reference,digit-train; --quick: fast)")
    ap.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda'")
    ap.add_argument('--reference-epochs', type=int, default=14,
                    help="epochs of the reference (the example's default: 14)")
    ap.add_argument('--stop-at-target', action=argparse.BooleanOptionalAction, default=True,
                    help="stop the reference once it reaches 99.0%% test accuracy")
    ap.add_argument('--max-train-samples', type=int, default=None,
                    help="train on the first N images only (default: all; --quick: 5000)")
    ap.add_argument('--seeds', default='42,43,44',
                    help="seeds of the fast recipe and digit-train (default: %(default)s)")
    ap.add_argument('--quick', action='store_true',
                    help="smoke run (fast only, 5,000 images) written to bench/results/train_speed-quick.*")
    a = ap.parse_args()
    parts = (a.parts or ('fast' if a.quick else 'fast,reference,digit-train')).split(',')
    n = a.max_train_samples if a.max_train_samples is not None else 5000 if a.quick else 0
    prepare_data(quiet=True)
    data = load_cleaned()
    dev = get_device(a.device)
    print(f"device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"dataset {data.version}{f', first {n:,} training images' if n else ''}\n", flush=True)
    seeds = [int(s) for s in a.seeds.split(',')][:1 if a.quick else None]
    res = {}
    if 'fast' in parts:
        for s in seeds: res[f'fast (seed {s})'] = run_fast(data, a.device, n, s)
    if 'reference' in parts: res['reference'] = run_reference(a.device, a.reference_epochs, a.stop_at_target, n)
    cols = ['recipe', 'epochs', 'training s', f's to {TARGET:.1%} test acc', 'test acc per epoch', 'images/s']
    rows, figs, notes = [], dict(target_accuracy=TARGET, train_samples=n or len(data.train[1])), []
    for k, rs in res.items():
        ips, t = sum(r[3] for r in rs)/len(rs), seconds_to_target(rs)
        rows.append([k, len(rs), f"{rs[-1][1]:.1f}", to_target(rs), ' '.join(f'{r[2]:.4f}' for r in rs), f"{ips:,.0f}"])
        figs.update({f'{k}_epochs': len(rs), f'{k}_training_seconds': round(rs[-1][1], 2),
                     f'{k}_seconds_to_target': t if t is None else round(t, 2), f'{k}_test_accuracy': rs[-1][2],
                     f'{k}_images_per_second': round(ips)})
    fast = [rs for k, rs in res.items() if k.startswith('fast')]
    if fast:
        mean = lambda i: sum(rs[-1][i] for rs in fast)/len(fast)
        rows.append([f'fast, mean of {len(fast)}', len(fast[0]), f"{mean(1):.1f}", '', f"{mean(2):.4f}", ''])
        figs.update(fast_seeds=len(fast), fast_training_seconds=round(mean(1), 2), fast_test_accuracy=round(mean(2), 5))
    print('\n' + table(cols, rows))
    if fast and 'reference' in res:
        f, r = fast[0][-1][1] if mean(2) >= TARGET else None, seconds_to_target(res['reference'])
        if f is not None and r is not None:
            figs['speedup'] = round(r/mean(1), 2)
            notes.append(f"speed-up to {TARGET:.1%} (mean of the fast seeds): {r/mean(1):.1f}x")
            print('\n' + notes[-1])
    if 'digit-train' in parts:
        runs = [run_digit_train(data, n, s) for s in seeds]
        for s, (wall, acc, ep) in zip(seeds, runs):
            notes.append(f"digit-train (defaults, --seed {s}{f', --max-train-samples {n}' if n else ''}): {wall:.0f} s "
                         f"wall for the whole command, {ep} epochs, test accuracy {acc:.4f}")
            print(notes[-1])
        wall, acc = max(r[0] for r in runs), sum(r[1] for r in runs)/len(runs)
        figs.update(digit_train_wall_seconds=round(wall, 1), digit_train_test_accuracy=round(acc, 5),
                    digit_train_epochs=runs[0][2], digit_train_seeds=len(runs))
        notes.append(f"digit-train over {len(runs)} seeds: mean test accuracy {acc:.4f}, slowest {wall:.0f} s")
        print('\n' + notes[-1])
    notes.append(f"device {dev}, dataset {data.version}")
    save('train_speed-quick' if a.quick else 'train_speed', rows, cols, notes, figs)


if __name__ == '__main__':
    main()
