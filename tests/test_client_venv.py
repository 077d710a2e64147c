"""The light client as a user installs it: the wheel with its `[client]` extra into a fresh virtual environment from
the package index, without torch (what `pip install 'digit-recognition[client]'` installs; the environment is made by
uv, which resolves and installs the same packages in seconds where pip takes a minute). `digit-predict` reads digits
there with ONNX Runtime, from an ONNX file and from a model logged on an MLflow server, and imports no torch."""
import os, re, subprocess, sys
import pytest
from helpers import ROOT, BIN, server_env

pytestmark = pytest.mark.slow
MAX_MB = 400          # the budget for a client-only environment


@pytest.fixture(scope='session')     # not 'module': xdist_groups runs this file's tests that read the session's
def client_venv(tmp_path_factory):   # checkpoint last, after other files' tests, and pytest would build it twice
    "A fresh venv with the wheel and its `[client]` extra from the package index; `run(cmd, *args, env=)`."
    d = tmp_path_factory.mktemp('client-venv')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', d/'dist',
                    ROOT], check=True, capture_output=True)
    whl = next((d/'dist').glob('digit_recognition-*.whl'))
    py = d/'venv'/'bin'/'python'
    subprocess.run([BIN/'uv', 'venv', '-q', d/'venv'], check=True, capture_output=True)
    r = subprocess.run([BIN/'uv', 'pip', 'install', '-q', '--compile-bytecode', '--python', py, f"{whl}[client]"],
                       capture_output=True, text=True)                 # (bytecode compiled, as pip leaves it)
    assert r.returncode == 0, r.stderr[-3000:]
    home = d/'home'; home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(('DIGIT_', 'MLFLOW_', 'PYTHON', 'VIRTUAL_ENV'))}
    def run(cmd, *args, env=None, check=0):
        exe = [py, '-c', cmd] if cmd.startswith('import') else [d/'venv'/'bin'/cmd]
        r = subprocess.run([*exe, *map(str, args)], cwd=home, env={**base, **(env or {})}, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == check, f"{cmd} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        return r
    return run, d/'venv'


def imported(stderr:str) -> set:
    "Top-level modules named in `python -X importtime` output."
    return {m.group(1).split('.')[0] for m in re.finditer(r'^import time:.*\|\s+(\S+)$', stderr, re.M)}


def test_client_environment_has_no_torch_and_fits_the_budget(client_venv):
    run, env_dir = client_venv
    out = run('import importlib.util as u; print([m for m in ("torch", "torchvision", "onnxruntime", "mlflow") '
              'if u.find_spec(m)])').stdout
    assert out.strip() == "['onnxruntime', 'mlflow']", out          # mlflow-skinny, and no torch
    size = sum(f.stat().st_size for f in env_dir.rglob('*') if f.is_file() and not f.is_symlink())/2**20
    assert size <= MAX_MB, f"the client environment takes {size:.0f} MB (budget {MAX_MB} MB)"


def test_digit_predict_reads_with_onnx_and_imports_no_torch(client_venv, checkpoint_dir, tmp_path):
    "An ONNX file and the checkpoint it came from give the same answer; the client command never imports torch."
    run, _ = client_venv
    from digit_recognition.client import DigitPredictor
    expected = DigitPredictor.load(str(checkpoint_dir/'best.pt')).predict(checkpoint_dir/'digit.png')
    r = run('digit-predict', checkpoint_dir/'digit.png', '--model', checkpoint_dir/'model.onnx', '--format', 'csv',
            env={'PYTHONPROFILEIMPORTTIME': '1'})
    row = r.stdout.splitlines()[1].split(',')
    assert int(row[1]) == expected.digit and abs(float(row[2]) - expected.probability) <= 1e-4, (r.stdout, expected)
    mods = imported(r.stderr)
    assert 'onnxruntime' in mods and 'digit_recognition' in mods, sorted(mods)   # the profile is real
    assert not mods & {'torch', 'torchvision', 'mlflow'}, sorted(mods & {'torch', 'torchvision', 'mlflow'})


def test_digit_predict_reads_a_model_logged_on_the_server(client_venv, mlflow_server, server_run, checkpoint_dir,
                                                          tmp_path):
    "A `runs:/` URI on the login server: the logged model's ONNX file, downloaded with mlflow-skinny; no torch."
    run, _ = client_venv
    rid, _, _ = server_run
    env = {**server_env(mlflow_server, tmp_path), 'PYTHONPROFILEIMPORTTIME': '1'}   # the run's folder is not here
    r = run('digit-predict', checkpoint_dir/'digit.png', '--model', f"runs:/{rid}/model", '--format', 'json', env=env)
    assert '"digit"' in r.stdout, r.stdout
    assert mlflow_server[2] not in r.stdout + r.stderr                    # the password never shows
    mods = imported(r.stderr)
    assert 'onnxruntime' in mods and 'mlflow' in mods and 'torch' not in mods, sorted(mods)
