"""Credentials written into the tracking URI (`http://USER:PASSWORD@host`) never leak: not in what the commands print,
not in training_results/ or the executed notebooks, not on the tracking server (artifacts, backend store, log)."""
import json, os, shutil, subprocess
from pathlib import Path
import pytest
from helpers import ROOT, BIN, together

TINY = ['--epochs', '1', '--max-train-samples', '500', '--batch-size', '100', '--no-augment', '--width', '16',
        '--no-tta']


def run_in(cwd, cmd, *args, env):
    e = {k: v for k, v in os.environ.items()
         if k not in ('MLFLOW_TRACKING_URI', 'MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD',
                      'MLFLOW_REGISTRY_URI')}
    r = subprocess.run([str(BIN/cmd), *map(str, args)], cwd=cwd, env={**e, **env}, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout + r.stderr


def files_holding(secret:str, *folders) -> list:
    "Every file under `folders` whose bytes contain `secret`."
    files = [f for d in map(Path, folders) for f in ([d] if d.is_file() else d.rglob('*')) if f.is_file()]
    assert files
    return [f for f in files if secret.encode() in f.read_bytes()]


@pytest.mark.slow
def test_credentials_in_the_uri_never_leak(mlflow_server, tmp_path, data_ready):
    "The two commands are independent (each its own runs; one results folder): they run at the same time."
    uri, user, pw = mlflow_server
    raw = uri.replace('http://', f'http://{user}:{pw}@')
    results = tmp_path/'results'
    paths = {'DIGIT_PATHS_RESULTS_DIR': str(results), 'DIGIT_PATHS_CLEANED_DIR': str(ROOT/'dataset_cleaned'),
             'DIGIT_PATHS_DATA_DIR': str(ROOT/'data'), 'DIGIT_MLFLOW_REGISTERED_MODEL': 'digit-recognizer-secrets-test'}
    # 1. The URI in a project's .env: the whole pipeline (train, evaluate, register), run from that project folder.
    project = tmp_path/'project'; project.mkdir()
    shutil.copy(ROOT/'settings.ini', project); (project/'nbs').symlink_to(ROOT/'nbs')
    (project/'.env').write_text(f"MLFLOW_TRACKING_URI={raw}\n")
    # 2. The URI in the environment: a sweep (a grid study: its parent run, a child, the study's storage).
    out = ''.join(together(
        lambda: run_in(project, 'digit-pipeline', *TINY, '--min-accuracy', '0', env=paths),
        lambda: run_in(ROOT, 'digit-sweep', '--grid', 'lr=0.01', *TINY, env={**paths, 'MLFLOW_TRACKING_URI': raw})))
    assert 'best val_accuracy' in out and 'champion' in out      # everything really ran, against the server
    assert pw not in out
    notebooks = list((results/'notebooks').glob('*.ipynb')) + list(results.rglob('evaluation.ipynb'))
    assert len(notebooks) >= 3                                   # sweep child, pipeline's train and evaluation
    for nb in notebooks:
        injected = json.loads(nb.read_text())['metadata']['papermill']['parameters']
        assert raw not in json.dumps(injected) and pw not in json.dumps(injected), nb
    assert files_holding(pw, results) == []
    server = mlflow_server.dir
    assert files_holding(pw, server/'artifacts', server/'mlflow.db', server/'server.log') == []
    assert len(list((mlflow_server.dir/'artifacts').rglob('*.ipynb'))) >= 3   # the notebooks did reach the server
