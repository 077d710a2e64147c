"""Faults that must end in one clear line, or not happen at all: parallel first runs on a new SQLite store, Ctrl-C,
a damaged dataset or an impossible parameter (caught before a run exists), a wrong `--resume`."""
import os, shutil, signal, subprocess, sys, time
import pytest
from helpers import ROOT, BIN, together, as_in_a_terminal

TINY = ['--epochs', '1', '--max-train-samples', '500', '--batch-size', '100', '--width', '16', '--no-tta']


def local_env(d):
    return {'MLFLOW_TRACKING_URI': f"sqlite:///{d/'mlflow.db'}", 'DIGIT_PATHS_RESULTS_DIR': str(d/'results'),
            'MLFLOW_TRACKING_USERNAME': None, 'MLFLOW_TRACKING_PASSWORD': None}


def runs_in(d):
    import mlflow
    c = mlflow.MlflowClient(f"sqlite:///{d/'mlflow.db'}")
    return [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]


@pytest.mark.slow            # three processes importing MLflow and creating its schema, at once
def test_parallel_first_runs_on_a_new_store(tmp_path):
    "Three processes open a store that does not exist yet, at the same moment: all succeed, each with its run."
    code = ("import sys, time; from pathlib import Path\n"
            "from digit_recognition.tracking import connect_tracking; import mlflow\n"
            "Path(sys.argv[1]).touch()\n"                                    # imported: ready
            "while not Path(sys.argv[2]).exists(): time.sleep(0.005)\n"      # then wait for the start
            "connect_tracking(); mlflow.set_experiment('digit-recognition')\n"
            "with mlflow.start_run(): mlflow.log_metric('x', 1)\n")
    env = {**os.environ, 'MLFLOW_TRACKING_URI': f"sqlite:///{tmp_path/'mlflow.db'}"}
    ready, go = [tmp_path/f'ready-{i}' for i in range(3)], tmp_path/'go'
    ps = [subprocess.Popen([sys.executable, '-c', code, r, go], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for r in ready]
    deadline = time.time() + 300
    while not all(r.exists() for r in ready) and all(p.poll() is None for p in ps) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()                                                 # every process has imported the library: start
    outs = [p.communicate(timeout=300) for p in ps]
    assert [p.returncode for p in ps] == [0, 0, 0], outs
    assert not any('Traceback' in err for _, err in outs)
    assert len(runs_in(tmp_path)) == 3


@pytest.fixture(scope='module')
def interrupted(tmp_path_factory, data_ready):
    """Ctrl-C in a terminal (SIGINT to the foreground process group) while `digit-train` trains (4 epochs, on a new
    local store), once its first epoch's checkpoint is written: `(returncode, stderr, folder)`. Its run, KILLED with
    last.pt, is also the one the --resume test resumes, so that test trains nothing of its own."""
    d = tmp_path_factory.mktemp('interrupted')
    env = {**os.environ, **{k: v for k, v in local_env(d).items() if v}}
    for k in ('MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD'): env.pop(k, None)
    p = subprocess.Popen([str(BIN/'digit-train'), '--epochs', '4', '--max-train-samples', '8000', '--no-tta'], cwd=ROOT,
                         env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=as_in_a_terminal)
    deadline = time.time() + 240
    while not list((d/'results').glob('*/last.pt')) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    time.sleep(1)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    return p.returncode, err, d, out


@pytest.mark.slow
def test_ctrl_c_is_one_line(interrupted):
    "Ctrl-C during training: one line (not a second one from the kernel), exit 130, the run KILLED."
    returncode, err, d, out = interrupted
    assert returncode == 130, err[-3000:]
    assert 'Traceback' not in err and 'ZMQError' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
    rid = next((d/'results').glob('*/last.pt')).parent.name
    assert err.strip().splitlines()[-1].startswith('interrupted;') and f'digit-train --resume {rid}' in err
    said = [l for l in (out + err).splitlines() if l.startswith('interrupted')]      # (the folder is 'interrupted0')
    assert len(said) == 1 and said[0] == err.strip().splitlines()[-1], (out[-2000:], err[-2000:])
    (run,) = runs_in(d)
    assert run.info.run_id == rid and run.info.status == 'KILLED'


@pytest.mark.slow            # two processes of `digit-train`: no kernel, but seconds of one core all the same
def test_damaged_dataset_and_bad_values_fail_before_a_run(tmp_path, run_cli, data_ready):
    cleaned = tmp_path/'cleaned'; shutil.copytree(ROOT/'dataset_cleaned', cleaned)
    f = cleaned/'val.npz'; b = bytearray(f.read_bytes()); b[len(b)//2] ^= 0xFF; f.write_bytes(bytes(b))
    env = {**local_env(tmp_path), 'DIGIT_PATHS_CLEANED_DIR': str(cleaned)}
    r = run_cli('digit-train', *TINY, env=env, check=1)
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {f}: sha256") and 'Traceback' not in r.stderr
    assert not (tmp_path/'results').exists() and runs_in(tmp_path) == []   # no run, no papermill notebook was started
    # An impossible value, through the command (the notebook's `TrainParams` tests check every other message).
    r = run_cli('digit-train', *TINY, '--lr', 'nan', env=local_env(tmp_path), check=1)
    assert r.stderr.strip().splitlines()[-1] == 'error: lr: nan (expected a finite number)', r.stderr
    assert runs_in(tmp_path) == []


@pytest.mark.slow
def test_resume_says_what_it_took_the_argument_for(tmp_path, run_cli, interrupted):
    "A file that is no checkpoint, a run the tracking server does not have, flags that contradict the run's plan."
    _, _, d, _ = interrupted
    env = local_env(d)
    rid = next((d/'results').glob('*/last.pt')).parent.name           # the interrupted run: 4 epochs, lr 0.02
    notes = tmp_path/'notes.pt'; notes.write_text('not a checkpoint')
    other = tmp_path/'elsewhere'
    r, r2, r3 = together(lambda: run_cli('digit-train', '--resume', notes, env=env, check=1),
                         lambda: run_cli('digit-train', '--resume', d/'results'/rid, check=1,
                                         env={**env, 'MLFLOW_TRACKING_URI': f"sqlite:///{other}.db"}),
                         lambda: run_cli('digit-train', '--resume', rid, '--epochs', '2', '--lr', '0.5', env=env,
                                         check=1))
    assert r.stderr.strip() == (f"error: resume: '{notes}' was taken for the checkpoint {notes}, "
                                "but not a readable checkpoint (UnpicklingError)")
    assert r2.stderr.strip().splitlines()[-1].startswith(
        f"error: resume: '{d/'results'/rid}' is a checkpoint of run {rid}, which the tracking server")
    assert 'Traceback' not in r2.stderr
    assert r3.stderr.strip().splitlines()[-1] == (
        "error: resume: --epochs 2 (the run has 4), --lr 0.5 (the run has 0.02): a resumed run "
        "continues as it was planned; leave these out, or start a new run to change them")
    (run,) = runs_in(d)                                                 # and nothing started
    assert run.info.status == 'KILLED'
