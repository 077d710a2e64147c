"""`digit-train` against a real MLflow server with login: what lands there, and what happens when it can't; and
`digit-sweep` running three trainings at once on the default local SQLite stores."""
import csv, json, re
from pathlib import Path
import numpy as np
import pytest
from helpers import TINY_RUN as TINY, server_env, together


@pytest.fixture(scope='module')
def client(mlflow_server):
    "An MLflow client of the login server, for this module only: the worker's later tests get neither login nor URI."
    import os, mlflow
    uri, user, pw = mlflow_server
    before = os.environ.get('MLFLOW_TRACKING_URI')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('MLFLOW_TRACKING_USERNAME', user)
        mp.setenv('MLFLOW_TRACKING_PASSWORD', pw)
        mlflow.set_tracking_uri(uri)
        yield mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(before)        # MLflow's own and the environment's, as they were


@pytest.fixture(scope='module')
def trained(server_run):
    "The session's tiny run on the server (conftest.server_run): `(run_id, results, completed_process)`."
    return server_run


@pytest.mark.slow
def test_run_is_recorded(trained, client):
    rid, results, r = trained
    run = client.get_run(rid)
    assert run.info.status == 'FINISHED' and run.info.run_name == 'tiny'
    p = run.data.params
    assert (p['model'], p['epochs'], p['max_train_samples'], p['batch_size']) == ('cnn', '2', '1000', '100')
    assert {'lr', 'optimizer', 'schedule', 'weight_decay', 'augment', 'seed', 'device', 'patience'} <= set(p)
    for k in ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'lr', 'epoch_seconds', 'images_per_second'):
        assert [m.step for m in client.get_metric_history(rid, k)] == [1, 2], k
    manifest = json.loads((Path(__file__).parent.parent/'dataset_cleaned'/'manifest.json').read_text())
    t = run.data.tags
    assert t['dataset_version'] == manifest['version'] and t['device'] == 'cpu' and t['torch_version']
    from digit_recognition.training import native_bfloat16
    assert (p['precision'], t['forward_dtype']) == ('auto', 'bfloat16' if native_bfloat16('cpu') else 'float32')
    assert re.fullmatch(r'[0-9a-f]{40}|unknown', t['git_commit'])
    ds = run.inputs.dataset_inputs
    assert len(ds) == 1 and ds[0].dataset.digest == manifest['version']
    assert {o.value for o in ds[0].tags} >= {'training'}
    arts = {a.path for a in client.list_artifacts(rid)}
    assert {'curves.png', 'notebook'} <= arts
    nb = [a.path for a in client.list_artifacts(rid, 'notebook')]
    assert nb == [f'notebook/{rid}.ipynb']
    assert (results/rid/'best.pt').is_file() and (results/rid/'last.pt').is_file()
    # calibrated after training: the temperature is in best.pt and logged with the validation ECE before and after
    import torch
    ck = torch.load(results/rid/'best.pt', weights_only=True)
    met = run.data.metrics
    assert 0.05 <= ck['temperature'] <= 20 and met['temperature'] == pytest.approx(ck['temperature'])
    assert 0 <= met['val_ece'] <= 1 and 0 <= met['val_ece_uncalibrated'] <= 1
    assert (results/rid/'model.onnx').is_file()


@pytest.mark.slow
def test_logged_model_predicts(trained, client):
    import mlflow, torch
    from digit_recognition.mlmodel import load_logged_model
    rid = trained[0]
    m = load_logged_model(f"runs:/{rid}/model")                # weights only: no pickle in the logged model
    from digit_recognition.data import load_cleaned
    x, y = load_cleaned(splits=('val',)).val
    with torch.no_grad(): p = m(x[:200].float()/255)
    assert p.shape == (200, 10)
    assert torch.allclose(p.sum(1), torch.ones(200), atol=1e-5)
    assert (p.argmax(1) == y[:200]).float().mean() > 0.7
    info = mlflow.models.get_model_info(f"runs:/{rid}/model")
    assert info.signature is not None
    assert tuple(info.signature.inputs.to_dict()[0]['tensor-spec']['shape']) == (-1, 28, 28)
    pf = mlflow.pyfunc.load_model(f"runs:/{rid}/model")     # what `mlflow models serve` runs: a batch of 28x28 arrays
    q = np.asarray(pf.predict(x[:5, 0].numpy().astype(np.float32)/255))
    assert q.shape == (5, 10) and np.allclose(q, p[:5].numpy(), atol=1e-5)
    # calibrated: what the pyfunc and the checkpoint's loader return is softmax(logits/T), T from best.pt
    from digit_recognition.training import model_from_checkpoint
    ck = trained[1]/rid/'best.pt'
    t = torch.load(ck, weights_only=True)['temperature']
    with torch.no_grad(): want = torch.softmax(model_from_checkpoint(ck)(x[:5].float()/255)/t, dim=1).numpy()
    assert np.allclose(q, want, atol=1e-5)
    # the ONNX file is inside the logged model, beside the checkpoint, and ONNX Runtime agrees with the pyfunc
    import onnxruntime as ort
    d = Path(mlflow.artifacts.download_artifacts(f"runs:/{rid}/model"))
    assert (d/'artifacts'/'best.pt').is_file() and (d/'artifacts'/'model.onnx').is_file()
    sess = ort.InferenceSession(str(d/'artifacts'/'model.onnx'), providers=['CPUExecutionProvider'])
    o = sess.run(['probabilities'], {'images': x[:200, 0].numpy().astype(np.float32)/255})[0]
    assert (o.argmax(1) == p.argmax(1).numpy()).all() and np.abs(o - p.numpy()).max() <= 1e-4
    # the "not sure" threshold travels with the model: best.pt, the MLflow model's metadata, the ONNX file's; and the
    # answers are the same from the ONNX file (DigitPredictor) and from the pyfunc with its metadata's threshold
    from digit_recognition.client import DigitPredictor
    from digit_recognition.outliers import families, make_outlier
    th = torch.load(ck, weights_only=True)['reject_threshold']
    assert pf.metadata.metadata['reject_threshold'] == pytest.approx(th) == info.metadata['reject_threshold']
    assert float(sess.get_modelmeta().custom_metadata_map['reject_threshold']) == th
    fams = families('test')
    images = list(x[:30, 0].numpy()) + [make_outlier(fams[i], i, x[:50, 0].numpy()) for i in range(0, len(fams), 3)]
    a = DigitPredictor.load(str(d/'artifacts'/'model.onnx')).predict(images)
    b = DigitPredictor(pf.predict, min_confidence=pf.metadata.metadata['reject_threshold']).predict(images)
    assert [(r.digit, r.reason) for r in a] == [(r.digit, r.reason) for r in b]
    assert any(r.unsure for r in a) and any(not r.unsure for r in a)


@pytest.mark.slow
def test_executed_notebook_and_no_secrets(trained, client, mlflow_server, tmp_path):
    rid, results, r = trained
    pw = mlflow_server[2]
    local = client.download_artifacts(rid, f'notebook/{rid}.ipynb', str(tmp_path))
    text = Path(local).read_text()
    nb = json.loads(text)
    assert nb['metadata']['papermill']['parameters']['run_id'] == rid
    assert any('injected-parameters' in c['metadata'].get('tags', []) for c in nb['cells'])
    assert 'best_val_accuracy' in text and not any('test_eq' in ''.join(c['source']) for c in nb['cells'])
    assert pw not in text and pw not in r.stdout and pw not in r.stderr
    assert 'Kernel is running over TCP' not in r.stderr        # the kernel listens on IPC sockets, not a TCP port
    assert r.stderr.count('epoch 1/2:') <= 3, r.stderr          # not a terminal: a few progress updates, not dozens
    run = client.get_run(rid)
    assert pw not in json.dumps(run.data.params) + json.dumps(run.data.tags)


@pytest.fixture(scope='module')
def sweep(tmp_path_factory, run_cli, data_ready):
    """This module's sweep on the default local stores (a SQLite MLflow store and the study's SQLite storage, fresh in
    a temporary folder): two learning rates x two optimizers, three runs at a time, so that three workers and their
    kernels write to one mlflow.db at once. 'lion' is not an optimizer: its two children fail (before a run or a kernel
    exists), the two 'adamw' ones finish. One sweep for the parent-and-children tests and the failed-child test:
    `(completed_process, folder, client)`."""
    import mlflow
    d = tmp_path_factory.mktemp('sweep')
    uri = f"sqlite:///{d/'mlflow.db'}"
    env = {'MLFLOW_TRACKING_URI': uri, 'DIGIT_PATHS_RESULTS_DIR': str(d/'results'),
           'MLFLOW_TRACKING_USERNAME': None, 'MLFLOW_TRACKING_PASSWORD': None}
    r = run_cli('digit-sweep', '--grid', 'lr=0.003,0.03', '--grid', 'optimizer=adamw,lion', '--jobs', '3',
                '--epochs', '1', '--max-train-samples', '600', '--no-augment', '--no-tta', env=env)
    return r, d, mlflow.MlflowClient(uri)


@pytest.mark.slow
def test_sweep_parent_and_children(sweep, tmp_path):
    r, d, client = sweep
    assert 'database is locked' not in r.stdout + r.stderr
    pid = re.search(r'^sweep ([0-9a-f]{32}):', r.stdout, re.M)
    assert pid, r.stdout[-3000:] + r.stderr[-3000:]
    pid = pid.group(1)
    parent = client.get_run(pid)
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{pid}'")     # lion's never started
    assert sorted((c.data.params['lr'], c.data.params['optimizer']) for c in children) == [('0.003', 'adamw'),
                                                                                          ('0.03', 'adamw')]
    assert all(c.info.status == 'FINISHED' and c.data.params['epochs'] == '1' for c in children)
    assert sorted(p.name for p in (d/'results').iterdir() if p.is_dir() and p.name != 'notebooks') == sorted(
        c.info.run_id for c in children)                                          # no run lost, none trained twice
    local = Path(client.download_artifacts(pid, 'comparison.csv', str(tmp_path)))
    header, *rows = csv.reader(local.read_text().splitlines())
    assert header[:4] == ['lr', 'optimizer', 'status', 'best_val_accuracy']
    assert [row[2] for row in rows] == ['ok', 'ok', 'failed', 'failed']            # best first, failed runs last
    accs = [float(row[3]) for row in rows[:2]]
    assert accs == sorted(accs, reverse=True)
    assert {a.path for a in client.list_artifacts(pid)} >= {'comparison.csv', 'comparison.md', 'comparison.png'}
    best = max(children, key=lambda c: c.data.metrics['best_val_accuracy'])
    assert parent.data.tags['best_run_id'] == best.info.run_id
    # the sweep is a grid study in the default study storage, beside the runs: one trial per combination
    import optuna
    study = optuna.load_study(study_name=parent.info.run_name, storage=f"sqlite:///{d/'results'/'optuna.db'}")
    trials = [t for t in study.get_trials() if not t.user_attrs.get('surplus')]
    assert sorted((t.params['lr'], t.params['optimizer'], t.state.name) for t in trials) == [
        (0.003, 'adamw', 'COMPLETE'), (0.003, 'lion', 'FAIL'), (0.03, 'adamw', 'COMPLETE'), (0.03, 'lion', 'FAIL')]


@pytest.mark.slow
def test_sweep_failed_child_does_not_stop_others(sweep):
    r, _, _ = sweep
    assert r.returncode == 1 and r.stdout.count("FAILED: optimizer: unknown 'lion'") == 2, r.stdout[-3000:]
    assert r.stderr.strip().splitlines()[-1] == 'error: 2 of 4 runs failed (see the table above)'
    assert len(re.findall(r'^\| 0\.0(03|3) \| adamw \| ok \| 0\.\d{4} \|', r.stdout, re.M)) == 2, r.stdout[-3000:]
    assert 'database is locked' not in r.stdout + r.stderr


@pytest.mark.slow
def test_wrong_password_fails_fast_and_keeps_checkpoint(trained, mlflow_server, run_cli):
    rid, results, _ = trained
    before = {p.name: p.read_bytes() for p in (results/rid).glob('*.pt')}
    env = server_env(mlflow_server, results, password='not-the-password')
    r, r2 = together(lambda: run_cli('digit-train', *TINY, env=env),
                     lambda: run_cli('digit-train', '--resume', rid, '--epochs', '3', env=env))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (f"error: tracking server {mlflow_server[0]} refused the credentials; "
                                                 "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    assert 'Traceback' not in r.stderr and 'not-the-password' not in r.stderr + r.stdout
    assert r2.returncode == 1 and 'refused the credentials' in r2.stderr
    assert {p.name: p.read_bytes() for p in (results/rid).glob('*.pt')} == before
    assert sorted(p.name for p in results.iterdir() if p.name != 'notebooks') == [rid]   # no new run folder


def test_unreachable_server(tmp_path, run_cli):
    from helpers import refused_port
    with refused_port() as port:
        r = run_cli('digit-train', *TINY, env={'MLFLOW_TRACKING_URI': f'http://127.0.0.1:{port}',
                                               'DIGIT_PATHS_RESULTS_DIR': str(tmp_path)})
    assert r.returncode == 1 and 'cannot be reached' in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_killed_run_keeps_checkpoint_and_resumes(tmp_path, mlflow_server, client, data_ready):
    "A run killed mid-training keeps its last completed epoch; --resume finishes it in the same MLflow run."
    import os, signal, subprocess, time, torch
    from helpers import ROOT, BIN, as_in_a_terminal
    env = {**os.environ, **server_env(mlflow_server, tmp_path)}
    p = subprocess.Popen([str(BIN/'digit-train'), '--epochs', '4', '--max-train-samples', '1000', '--no-tta',
                          '--quiet'], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True, preexec_fn=as_in_a_terminal)
    deadline = time.time() + 300
    while not list(tmp_path.glob('*/last.pt')) and time.time() < deadline and p.poll() is None: time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    last = next(tmp_path.glob('*/last.pt')); rid = last.parent.name
    # MLflow still shows the run RUNNING; the next start on this machine sees that its process is gone.
    from digit_recognition.tracking import mark_stale_runs, process_alive
    run = client.get_run(rid); kernel = int(run.data.tags['pid'])
    assert run.info.status == 'RUNNING'
    while process_alive(kernel) and time.time() < deadline: time.sleep(0.2)   # it notices that its parent died
    assert mark_stale_runs(client, run.info.experiment_id) == [rid]
    run = client.get_run(rid)
    assert run.info.status == 'KILLED' and run.data.tags['stale'].endswith('ended without finishing the run')
    ck = torch.load(last, weights_only=True)
    assert 1 <= ck['epoch'] < 4 and (last.parent/'best.pt').is_file()
    assert not list(last.parent.glob('.*.part'))          # no half-written checkpoint left behind
    r = subprocess.run([str(BIN/'digit-train'), '--resume', rid], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming run {rid} after epoch {ck['epoch']} of 4" in r.stdout and f'run {rid}:' in r.stdout
    steps = [m.step for m in client.get_metric_history(rid, 'val_accuracy')]
    assert sorted(set(steps)) == list(range(1, 5))
    assert client.get_run(rid).info.status == 'FINISHED'


def test_bad_parameter_is_one_line(tmp_path, run_cli, data_ready):
    r = run_cli('digit-train', '--model', 'resnet', '--epochs', '1', env={'DIGIT_PATHS_RESULTS_DIR': str(tmp_path),
                'MLFLOW_TRACKING_URI': f"sqlite:///{tmp_path/'m.db'}"})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(
        "error: model: unknown model 'resnet' (expected one of mlp, cnn)")
