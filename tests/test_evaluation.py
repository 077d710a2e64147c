"""`digit-evaluate` and `digit-pipeline`: the evaluation files, the gate's exit codes, and the registry's decisions,
against the local sqlite store and once against the real MLflow server with login (on the session's tiny run there).
Every test here runs papermill kernels: all are marked slow."""
import json, os, re, shutil
from pathlib import Path
import numpy as np
import pytest
from helpers import ROOT, together

pytestmark = pytest.mark.slow

# Three tiny models whose test accuracies are ordered: weak < mid < strong (narrow: the tests measure the registry).
RECIPES = {'weak': dict(epochs=1, max_train_samples=200, lr=0.003, augment=False, width=16, tta=False),
           'mid': dict(epochs=2, max_train_samples=1000, lr=0.01, augment=False, width=16, tta=False),
           'strong': dict(epochs=3, max_train_samples=4000, lr=0.01, augment=False, width=16, tta=False)}


def flags(params:dict) -> list:
    "`digit-train`-style flags for `params`."
    flag = lambda k: '--' + k.replace('_', '-')
    return [f for k, v in params.items()
            for f in ([flag(k) if v else flag('no_' + k)] if isinstance(v, bool) else [flag(k), str(v)])]


@pytest.fixture(scope='module')
def local(tmp_path_factory, data_ready):
    """A throwaway local store (sqlite) and results folder, with the three tiny models trained into it by `train`, in
    this process: real MLflow runs and checkpoints, without three kernels (`digit-train`'s papermill route has its own
    tests)."""
    from fastcore.xtras import modified_env
    from digit_recognition.launch import train
    d = tmp_path_factory.mktemp('local')
    env = {'MLFLOW_TRACKING_URI': f"sqlite:///{d/'mlflow.db'}", 'DIGIT_PATHS_RESULTS_DIR': str(d/'results')}
    with modified_env('MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD', 'MLFLOW_REGISTRY_URI', **env):
        runs = {k: train(run_name=k, **p)['run_id'] for k, p in RECIPES.items()}
    return {**env, 'MLFLOW_TRACKING_USERNAME': None, 'MLFLOW_TRACKING_PASSWORD': None}, runs, d


def client_for(uri):
    import mlflow
    mlflow.set_tracking_uri(uri)       # (the registry follows the tracking URI; MLflow exports it to child processes)
    os.environ.pop('MLFLOW_REGISTRY_URI', None)
    return mlflow.MlflowClient(uri, uri)


def versions(client, name='digit-recognizer'):
    "Every version of `name` (search results leave out aliases, so each is read back whole)."
    try: found = client.search_model_versions(f"name = '{name}'")
    except Exception: return {}
    return {int(v.version): client.get_model_version(name, v.version) for v in found}


def test_registry_decisions(local, run_cli):
    env, runs, d = local
    c = client_for(env['MLFLOW_TRACKING_URI'])
    # The gate: below the threshold, exit 1 with a one-line reason, and nothing is registered.
    r = run_cli('digit-evaluate', runs['mid'], '--min-accuracy', '0.999', '--quiet', env=env, check=1)
    assert r.stderr.strip().splitlines()[-1].startswith('error: gate failed: test_accuracy 0.')
    assert 'is below the minimum 0.9990' in r.stderr and 'Traceback' not in r.stderr
    assert versions(c) == {}
    # The evaluation files hold the right numbers, and the run holds the same test_* metrics.
    ev = d/'results'/runs['mid']/'evaluation'
    m = json.loads((ev/'metrics.json').read_text())
    cm = np.array(m['metrics']['confusion_matrix'])
    manifest = json.loads((ROOT/'dataset_cleaned'/'manifest.json').read_text())
    n_test = np.load(ROOT/'dataset_cleaned'/manifest['splits']['test']['file'])['labels'].size
    assert cm.shape == (10, 10) and cm.sum() == n_test == m['n_images']
    assert abs(np.trace(cm)/cm.sum() - m['metrics']['accuracy']) < 1e-12
    assert [row['support'] for row in m['metrics']['per_class']] == cm.sum(1).tolist()
    assert 0 <= m['metrics']['ece'] <= 1 and m['metrics']['images_per_second'] > 0
    for f in ('report.md', 'confusion_matrix.png', 'confusion_matrix_normalized.png', 'per_class_f1.png',
              'confident_errors.png', 'reliability.png', 'evaluation.ipynb'):
        assert (ev/f).stat().st_size > 0, f
    assert (ev/'confusion_matrix.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    run = c.get_run(runs['mid'])
    assert run.data.metrics['test_accuracy'] == pytest.approx(m['metrics']['accuracy'])
    assert {'test_macro_f1', 'test_weighted_f1', 'test_ece', 'test_images_per_second'} <= set(run.data.metrics)
    assert {a.path for a in c.list_artifacts(runs['mid'], 'evaluation')} >= {'evaluation/metrics.json',
                                                                             'evaluation/reliability.png'}
    # Calibrated (the ECE before calibration beside it), and the run's ONNX file agrees with PyTorch on the test split.
    mm = m['metrics']
    assert mm['temperature'] == pytest.approx(run.data.metrics['temperature']) and mm['temperature'] != 1
    assert 0 <= mm['ece_uncalibrated'] <= 1 and mm['accuracy'] == pytest.approx(run.data.metrics['test_accuracy'])
    assert m['onnx'].endswith(f"{runs['mid']}/model.onnx")
    assert mm['onnx_top1_agreement'] == 1 and 0 <= mm['onnx_max_abs_diff'] <= 1e-4
    assert run.data.metrics['test_onnx_top1_agreement'] == 1
    assert run.data.metrics['test_ece_uncalibrated'] == pytest.approx(mm['ece_uncalibrated'])
    report = (ev/'report.md').read_text()
    assert f"temperature {mm['temperature']:.4f}" in report and 'agrees with PyTorch' in report

    # The first model that passes becomes champion (and challenger); its files were measured above, on this data.
    r = run_cli('digit-evaluate', runs['mid'], '--min-accuracy', '0.2', '--quiet', env=env, check=0)
    assert f"reusing the evaluation in {ev}" in r.stdout and 'version 1: champion (no champion yet' in r.stdout
    v = versions(c)[1]
    assert set(v.aliases) == {'champion', 'challenger'} and v.run_id == runs['mid']
    files = Path(c.get_model_version_download_uri('digit-recognizer', '1').removeprefix('file://'))
    assert (files/'artifacts'/'model.onnx').is_file() and (files/'artifacts'/'best.pt').is_file()
    assert v.tags['dataset_version'] == manifest['version']
    assert float(v.tags['test_accuracy']) == pytest.approx(m['metrics']['accuracy'], abs=1e-6)
    # A worse one is only challenger; the champion stays.
    r = run_cli('digit-evaluate', runs['weak'], '--min-accuracy', '0.05', '--quiet', env=env, check=0)
    assert 'version 2: challenger' in r.stdout and 'champion kept' in r.stdout
    vs = versions(c)
    assert vs[1].aliases == ['champion'] and vs[2].aliases == ['challenger'] and vs[2].tags['decision'] == 'challenger'
    assert float(vs[2].tags['test_accuracy']) < float(vs[1].tags['test_accuracy'])
    # A better one takes champion, and the old champion says by whom it was replaced.
    r = run_cli('digit-evaluate', runs['strong'], '--min-accuracy', '0.2', '--quiet', env=env, check=0)
    assert 'version 3: champion' in r.stdout
    vs = versions(c)
    assert set(vs[3].aliases) == {'champion', 'challenger'} and vs[1].aliases == [] and vs[1].tags['replaced_by'] == '3'
    assert 'decision_reason' in vs[3].tags and "champion version 1's" in vs[3].tags['decision_reason']

    # The champion loads as a pyfunc model and predicts from a batch of 28x28 arrays.
    import mlflow
    model = mlflow.pyfunc.load_model('models:/digit-recognizer@champion')
    x = np.load(ROOT/'dataset_cleaned'/manifest['splits']['test']['file'])['images'][:8].astype(np.float32)/255
    p = np.asarray(model.predict(x))
    assert p.shape == (8, 10) and np.allclose(p.sum(1), 1, atol=1e-4)


def test_no_register_and_bad_model(local, run_cli):
    env, runs, d = local
    c = client_for(env['MLFLOW_TRACKING_URI'])
    before = len(versions(c))
    r = run_cli('digit-evaluate', d/'results'/runs['weak']/'best.pt', '--min-accuracy', '0', '--no-register', '--quiet',
                env=env, check=0)
    assert 'registry' not in r.stdout and len(versions(c)) == before
    # A broken export (another model's ONNX file in the run folder) fails the evaluation: nothing is registered.
    onnx = d/'results'/runs['weak']/'model.onnx'
    kept = onnx.read_bytes()
    shutil.copy(d/'results'/runs['strong']/'model.onnx', onnx)
    try:
        broken, r, r2 = together(
            lambda: run_cli('digit-evaluate', runs['weak'], '--min-accuracy', '0', '--quiet', env=env, check=1),
            lambda: run_cli('digit-evaluate', 'no-such-model', env=env, check=1),
            lambda: run_cli('digit-evaluate', 'models:/no-such-model@champion', env=env, check=1))
    finally: onnx.write_bytes(kept)
    line = broken.stderr.strip().splitlines()[-1]
    assert line.startswith('error: onnx: ') and f"{runs['weak']}/model.onnx disagrees with PyTorch" in line, line
    assert 'not registered' in line and 'Traceback' not in broken.stderr
    assert len(versions(c)) == before
    assert r.stderr.strip() == ("error: model: 'no-such-model' is not a run id, a runs:/ or models:/ URI, "
                                "or a checkpoint file")
    assert r2.stderr.strip().startswith('error: model: cannot find models:/no-such-model@champion')


def test_pipeline_reuses_current_stages(tmp_path, run_cli, data_ready):
    env = {'MLFLOW_TRACKING_URI': f"sqlite:///{tmp_path/'mlflow.db'}",
           'DIGIT_PATHS_RESULTS_DIR': str(tmp_path/'results'),
           'MLFLOW_TRACKING_USERNAME': None, 'MLFLOW_TRACKING_PASSWORD': None}
    args = [*flags(RECIPES['mid']), '--min-accuracy', '0.2']
    first = run_cli('digit-pipeline', *args, env=env, check=0).stdout
    rid = re.search(r'^run\s+([0-9a-f]{32})$', first, re.M).group(1)
    assert 'version 1: champion' in first and f"{rid}/evaluation/report.md" in first, first[-1500:]
    second = run_cli('digit-pipeline', *args, env=env, check=0).stdout
    assert f'reusing run {rid}' in second and 'reusing the evaluation' in second and 'registered before' in second
    assert re.search(r'^run\s+([0-9a-f]{32})$', second, re.M).group(1) == rid
    forced = run_cli('digit-pipeline', *args, '--force', '--quiet', env=env, check=0).stdout
    assert re.search(r'^run\s+([0-9a-f]{32})$', forced, re.M).group(1) != rid and 'version 2' in forced
    failed = run_cli('digit-pipeline', *args[:-1], '0.9999', '--quiet', env=env, check=1)
    assert 'not registered' in failed.stdout and failed.stderr.strip().endswith('is below the minimum 0.9999')


def test_registry_on_the_login_server(mlflow_server, server_run, run_cli, monkeypatch):
    "The session's tiny run on the login server (conftest.server_run) is evaluated and registered there."
    uri, user, pw = mlflow_server
    rid, results, _ = server_run
    env = {'MLFLOW_TRACKING_URI': uri, 'MLFLOW_TRACKING_USERNAME': user, 'MLFLOW_TRACKING_PASSWORD': pw,
           'DIGIT_PATHS_RESULTS_DIR': str(results)}
    name = 'digit-recognizer-auth-test'
    r = run_cli('digit-evaluate', rid, '--min-accuracy', '0.2', '--quiet',
                env={**env, 'DIGIT_MLFLOW_REGISTERED_MODEL': name}, check=0)
    assert 'champion' in r.stdout and pw not in r.stdout + r.stderr
    monkeypatch.setenv('MLFLOW_TRACKING_USERNAME', user)     # this test's client only, not the worker's later tests
    monkeypatch.setenv('MLFLOW_TRACKING_PASSWORD', pw)
    c = client_for(uri)
    v = c.get_model_version_by_alias(name, 'champion')
    assert v.run_id == rid and v.tags['decision'] == 'champion'
    assert 'test_accuracy' in c.get_run(rid).data.metrics
    r = run_cli('digit-evaluate', rid, '--quiet', env={**env, 'MLFLOW_TRACKING_PASSWORD': 'wrong'}, check=1)
    assert r.stderr.strip().splitlines()[-1].startswith('error: tracking server')
    assert 'refused the credentials' in r.stderr
