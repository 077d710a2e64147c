"""Data-parallel training (`digit-train --nproc-per-node 2`: torchrun's engine, gloo on this CPU) end to end: a worker
killed mid-run ends the run with one clear line and keeps the last completed epoch; `--resume` finishes it in two
processes again, as one complete MLflow run (each epoch logged once, by rank 0) that `digit-evaluate` accepts. And the
arithmetic: two processes take the very steps of one with the same global batch."""
import os, re, signal, sqlite3, subprocess, time
from pathlib import Path
import pytest
from helpers import ROOT, BIN

DDP = ['--nproc-per-node', '2', '--batch-size', '100']
EPOCHS = 6         # tiny epochs of a second or two: room to kill a worker after the first, before the last


def local_env(d):
    "A local store and results folder in `d`, without the login of any server."
    return {'MLFLOW_TRACKING_URI': f"sqlite:///{d/'mlflow.db'}", 'DIGIT_PATHS_RESULTS_DIR': str(d/'results'),
            'MLFLOW_TRACKING_USERNAME': None, 'MLFLOW_TRACKING_PASSWORD': None}


def store(d):
    import mlflow
    c = mlflow.MlflowClient(f"sqlite:///{d/'mlflow.db'}")
    return c, [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]


def logged(d, key:str='val_accuracy') -> bool:
    "Whether the store in `d` holds a value of metric `key` yet (its SQLite file read directly: polled often, cheap)."
    try:
        with sqlite3.connect(f"file:{d/'mlflow.db'}?mode=ro", uri=True, timeout=1) as db:
            return db.execute('SELECT 1 FROM metrics WHERE key = ? LIMIT 1', (key,)).fetchone() is not None
    except sqlite3.Error: return False                      # not made yet, or being migrated


def descendants(pid:int) -> list:
    "The processes below `pid` (Linux), in the order they started: `(pid, command line)`."
    stat = {}
    for f in Path('/proc').glob('[0-9]*/stat'):
        try: s = f.read_text().rsplit(')', 1)[1].split(); stat[int(f.parent.name)] = (int(s[1]), int(s[19]))
        except (OSError, IndexError, ValueError): continue
    below, todo = [], [pid]
    while todo:
        parent = todo.pop(0); kids = [p for p, (pp, _) in stat.items() if pp == parent]
        below += kids; todo += kids
    out = []
    for k in sorted(below, key=lambda k: (stat[k][1], k)):
        try: out.append((k, Path(f'/proc/{k}/cmdline').read_bytes().replace(b'\0', b' ').decode()))
        except OSError: continue
    return out


@pytest.mark.slow
def test_killed_worker_ends_the_run_and_resume_finishes_it(tmp_path, run_cli, data_ready):
    """SIGKILL to one of the two workers: exit 1 with one line naming it, the run FAILED, last.pt kept; --resume ends
    it: one FINISHED run, each epoch logged once, evaluable. (One run for both, to keep the suite's time.)"""
    env = {**os.environ, **{k: v for k, v in local_env(tmp_path).items() if v}}
    for k in ('MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD'): env.pop(k, None)
    p = subprocess.Popen([str(BIN/'digit-train'), *DDP, '--epochs', str(EPOCHS), '--max-train-samples',
                          '2000', '--width', '16', '--no-tta', '--quiet'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not list((tmp_path/'results').glob('*/last.pt')) and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)                                # (the store is made: opening it now races no migration)
    while not logged(tmp_path) and p.poll() is None and time.time() < deadline: time.sleep(0.1)   # epoch 1 is recorded
    workers = [pid for pid, cmd in descendants(p.pid) if 'spawn_main' in cmd]     # the kernel's, rank 0 first
    assert p.poll() is None and len(workers) == 2, (workers, p.poll())
    os.kill(workers[-1], signal.SIGKILL)
    out, err = p.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert not re.search(r'^[EW]\d{4} ', err, re.M) and 'Traceback' not in err, err[-3000:]   # no engine notices
    rid = next((tmp_path/'results').glob('*/last.pt')).parent.name
    assert p.returncode == 1, err[-3000:]
    assert re.match(rf"error: training process [01] \(pid {workers[-1]}\) was killed by SIGKILL; the last completed "
                    rf"epoch is kept in .*/{rid}/last\.pt; continue with: digit-train --resume {rid} ", last), last
    from digit_recognition.tracking import process_alive
    assert not any(process_alive(w) for w in workers)                # the other worker was stopped too
    c, (run,) = store(tmp_path)
    assert run.info.status == 'FAILED'
    import torch
    done = torch.load(tmp_path/'results'/rid/'last.pt', weights_only=True)['epoch']
    assert 1 <= done < EPOCHS
    env = local_env(tmp_path)
    r = run_cli('digit-train', '--resume', rid, '--nproc-per-node', '2', env=env, check=0)
    assert f'run {rid}:' in r.stdout and 'training in 2 processes' in r.stdout
    assert [l.split(':')[0] for l in r.stdout.splitlines() if ' epoch ' in l and 'train_loss' in l] == \
           [f'[rank0] epoch {e}' for e in range(done + 1, EPOCHS + 1)]           # rank 0 prints, once per epoch
    c, (run,) = store(tmp_path)
    assert run.info.status == 'FINISHED' and run.data.tags['world_size'] == '2'
    assert run.data.params['batch_size'] == '100' and 'nproc_per_node' not in run.data.params   # not a knob
    for k in ('train_loss', 'val_accuracy', 'images_per_second'):                  # by rank 0 alone, once each
        assert [m.step for m in c.get_metric_history(rid, k)] == list(range(1, EPOCHS + 1)), k
    assert run.data.metrics['val_accuracy'] > 0.8
    assert {'best.pt', 'last.pt', 'model.onnx', 'result.json'} <= {p.name for p in (tmp_path/'results'/rid).iterdir()}
    assert {a.path for a in c.list_artifacts(rid)} >= {'notebook', 'curves.png'}
    e = run_cli('digit-evaluate', rid, '--min-accuracy', '0', '--no-register', '--quiet', env=env, check=0)
    assert f'{rid} on test' in e.stdout


def _same_steps_worker(rank, d, q):
    "One of two gloo processes of `test_two_processes_take_the_steps_of_one`."
    import torch, torch.distributed as dist
    from digit_recognition.data import load_cleaned
    from digit_recognition.model import get_model
    from digit_recognition.training import TrainParams, fit
    from digit_recognition.config import seed_everything
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{d}/store', rank=rank, world_size=2)
    try:
        seed_everything(0)
        st = fit(get_model('mlp', dropout=0.0), load_cleaned(splits=('train', 'val')), f'{d}/two', TrainParams(**SAME))
        if rank == 0: q.put(st['history'])
    finally: dist.destroy_process_group()


SAME = dict(model='mlp', width=16, epochs=2, max_train_samples=1000, batch_size=100, augment=False,
            label_smoothing=0.0, lr=0.01, device='cpu', patience=0,
            outlier_share=0,                                  # (each process draws non-digits of its own)
            precision='float32')                              # bfloat16 rounds each batch's half on its own


@pytest.mark.slow
def test_two_processes_take_the_steps_of_one(tmp_path, data_ready):
    """Nothing random but the order (no augmentation, dropout or batch norm): `fit` in two processes (`shard`, DDP's
    averaged gradients) takes the very steps of one process with the same global batch, to float rounding."""
    import torch, torch.multiprocessing as mp
    from digit_recognition.data import load_cleaned
    from digit_recognition.model import get_model
    from digit_recognition.training import TrainParams, fit
    from digit_recognition.config import seed_everything
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        seed_everything(0)
        one = fit(get_model('mlp', dropout=0.0), load_cleaned(splits=('train', 'val')), tmp_path/'one',
                  TrainParams(**SAME))['history']
    finally: torch.set_num_threads(threads)
    q = mp.get_context('spawn').SimpleQueue()
    mp.spawn(_same_steps_worker, args=(str(tmp_path), q), nprocs=2)
    two = q.get()
    for a, b in zip(one, two, strict=True):
        for k in ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'lr'):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a, b)
