"""Data-parallel training: the same recipe in 1 and 2 processes (`launch_fit`: torchrun's engine, gloo on CPUs, NCCL on
CUDA GPUs), on this machine.

Trains, on the first `--max-train-samples` cleaned MNIST images, the default recipe of settings.ini [train] (global
batch, learning rate and schedule unchanged whatever the number of processes) for `--epochs` epochs, once per process
count and device (`--repeats` times, interleaved, keeping the fastest: the machine may be shared), and prints a
table: wall seconds (start of the processes, rendezvous and data loading included),
training seconds (the epochs alone), images/s, the last epoch's validation accuracy and the test accuracy of the best
checkpoint. No MLflow: the workers train and checkpoint, as `digit-train --nproc-per-node N` has them do.

    python bench/ddp_speed.py                 # 3 epochs on 20,000 images, 1 and 2 processes (a few minutes on 2 cores)
    python bench/ddp_speed.py --quick         # smoke run: 1 epoch on 4,000 images

CUDA GPUs, when torch sees any, are measured too (1 process, and 2 when there are 2 GPUs). The table, with date,
machine and versions, goes to bench/results/ddp_speed.json and .md (a --quick run's to ddp_speed-quick.*).
"""
import argparse, os, tempfile, time
from dataclasses import asdict
import torch
from digit_recognition.config import seed_everything
from digit_recognition.data import load_cleaned, prepare_data
from digit_recognition.model import get_model
from digit_recognition.training import TrainParams, fit, evaluate, model_from_checkpoint
from digit_recognition.launch import launch_fit
from results import save, table


def run(data, params:TrainParams, procs:int) -> dict:
    "Train `params` in `procs` processes (1: `fit` in this one, as digit-train does); times and accuracies."
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        if procs == 1:
            seed_everything(params.seed); st = fit(get_model(params.model, width=params.width), data, d, params)
        else:
            plan = {'params': asdict(params), 'out': d, 'state': None, 'run_id': '', 'tracking_uri': '', 'trial': {},
                    'dataset_version': data.version}
            st = launch_fit(plan, params.device, nproc_per_node=procs)
        wall = time.time() - t0
        test = evaluate(model_from_checkpoint(f'{d}/best.pt'), *data.test)['accuracy']
    h = st['history']
    return dict(wall=wall, train=sum(e['epoch_seconds'] for e in h), ips=sum(e['images_per_second'] for e in h)/len(h),
                val=h[-1]['val_accuracy'], test=test, epochs=len(h))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--epochs', type=int, default=None, help="epochs (default: 3; --quick: 1)")
    ap.add_argument('--max-train-samples', type=int, default=None,
                    help="training images (default: 20000; --quick: 4000)")
    ap.add_argument('--procs', default='1,2', help="process counts to compare (default: %(default)s)")
    ap.add_argument('--seed', type=int, default=42)
    ap.add_argument('--repeats', type=int, default=None,
                    help="runs of each row, interleaved; the fastest is kept (default: 2; --quick: 1)")
    ap.add_argument('--quick', action='store_true', help="smoke run, written to bench/results/ddp_speed-quick.*")
    a = ap.parse_args()
    os.environ.setdefault('DIGIT_TEXT_PROGRESS', 'log')     # a progress bar now and then, not a flood
    epochs = a.epochs or (1 if a.quick else 3)
    n = a.max_train_samples or (4000 if a.quick else 20000)
    prepare_data(quiet=True)
    data = load_cleaned()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = ['cpu'] + (['cuda'] if gpus else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {gpus} CUDA GPU(s), dataset {data.version}, "
          f"{n:,} training images, {epochs} epoch(s)\n", flush=True)
    cols = ['device', 'processes', 'backend', 'wall s', 'training s', 'images/s', 'val acc', 'test acc']
    rows, figs = [], dict(epochs=epochs, train_samples=n, gpus=gpus)
    todo = [(dev, int(k)) for dev in devices for k in a.procs.split(',') if dev == 'cpu' or int(k) <= gpus]
    runs = {}
    for i in range(a.repeats or (1 if a.quick else 2)):
        for dev, procs in todo:
            p = TrainParams.from_settings(epochs=epochs, max_train_samples=n, seed=a.seed, device=dev, patience=0)
            print(f"{dev}, {procs} process(es), run {i + 1} ...", flush=True)
            runs.setdefault((dev, procs), []).append(run(data, p, procs))
    for (dev, procs), rs in runs.items():
        r = min(rs, key=lambda r: r['train'])
        backend = '-' if procs == 1 else 'nccl' if dev == 'cuda' else 'gloo'
        rows.append([dev, procs, backend, f"{r['wall']:.1f}", f"{r['train']:.1f}", f"{r['ips']:,.0f}",
                     f"{r['val']:.4f}", f"{r['test']:.4f}"])
        figs.update({f'{dev}_{procs}_{k}': round(v, 5 if k in ('val', 'test') else 2) for k, v in r.items()})
    notes = [f"recipe: settings.ini [train] (model {p.model}, global batch {p.batch_size}, lr {p.lr}, {p.schedule}, "
             f"augment {p.augment}), seed {a.seed}; the same global batch and schedule in every row; the fastest of "
             f"{len(rs)} run(s) each",
             f"CPU threads: one process uses torch's {torch.get_num_threads()}; N processes share the cores out "
             f"({max(1, torch.get_num_threads()//2)} each for 2), as digit-train --nproc-per-node does"]
    for dev in devices:
        one, two = figs.get(f'{dev}_1_train'), figs.get(f'{dev}_2_train')
        if one and two:
            figs[f'{dev}_speedup'] = round(one/two, 2)
            notes.append(f"{dev}: 2 processes train {one/two:.2f}x as fast as 1 (training seconds), "
                         f"{figs[f'{dev}_1_wall']/figs[f'{dev}_2_wall']:.2f}x counting their start")
    if not gpus:
        notes.append("no CUDA GPU here (none was lent to the session that ran this): the GPU rows (NCCL) are not "
                     "measured; run this on a machine with GPUs for them")
    print('\n' + table(cols, rows) + '\n\n' + '\n'.join(notes))
    save('ddp_speed-quick' if a.quick else 'ddp_speed', rows, cols, notes, figs)


if __name__ == '__main__':
    main()
