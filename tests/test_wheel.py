"""The package as a user installs it: a wheel, imported from a folder that is not a checkout, with no settings.ini
anywhere. The defaults ship inside the package; data, runs and the store go under the working folder (DIGIT_HOME).
Building the wheel and running every command from it takes minutes: all are marked slow."""
import os, re, subprocess, sys, zipfile
import pytest
from PIL import Image
from helpers import ROOT, together

pytestmark = pytest.mark.slow
TINY = ['--epochs', '1', '--max-train-samples', '1000', '--batch-size', '100', '--no-augment', '--width', '16',
        '--no-tta']


@pytest.fixture(scope='module')
def installed(tmp_path_factory, mnist_dir):
    "The project built as a wheel and installed with `pip --target` into a fresh folder; `(run, home)`."
    d = tmp_path_factory.mktemp('wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', d/'dist',
                    ROOT], check=True, capture_output=True)
    whl = next((d/'dist').glob('digit_recognition-*.whl'))
    assert {'digit_recognition/notebooks/training.ipynb', 'digit_recognition/notebooks/evaluation.ipynb'} <= set(
        zipfile.ZipFile(whl).namelist())
    site = d/'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', site, whl], check=True,
                   capture_output=True)
    home = d/'home'; home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(('DIGIT_', 'MLFLOW_'))}
    env.update(PYTHONPATH=str(site), MPLBACKEND='Agg', MNIST_DIR=str(mnist_dir),
               DIGIT_DATA_OUTLIERS='200', DIGIT_DATA_VIEWS='200')       # a few non-digits: made, and trained on
    def run(cmd, *args, check=0):
        exe = [sys.executable, '-c', cmd] if cmd.startswith('import') else [str(site/'bin'/cmd)]
        r = subprocess.run([*exe, *map(str, args)], cwd=home, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == check, f"{cmd} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        return r
    return run, home, site


def test_imports_come_from_the_wheel(installed):
    run, home, site = installed
    out = run("import digit_recognition, digit_recognition.launch as t; print(digit_recognition.__file__); "
              "print(t.training_notebook()); from digit_recognition.config import Settings; s = Settings(); "
              "print(s.root); print(s.lookup('train', 'epochs'))").stdout.splitlines()
    assert out[0].startswith(str(site)) and out[1].startswith(str(site))
    assert out[2] == str(home) and out[3] == "(11, 'defaults')"


def test_every_command_works_outside_a_checkout(installed):
    run, home, site = installed
    run('digit-data')
    assert (home/'dataset_cleaned'/'manifest.json').is_file() and (home/'data').is_dir()
    rid = re.search(r'^run ([0-9a-f]{32}):', run('digit-train', *TINY, '--quiet').stdout, re.M).group(1)
    assert (home/'training_results'/rid/'best.pt').is_file() and (home/'mlflow.db').is_file()
    r = run('digit-evaluate', rid, '--min-accuracy', '0', '--quiet')
    assert 'champion' in r.stdout and (home/'training_results'/rid/'evaluation'/'metrics.json').is_file()
    from digit_recognition.data import load_cleaned
    x, y = load_cleaned(home/'dataset_cleaned', splits=('test',)).test
    Image.fromarray(255 - x[0, 0].numpy()).resize((112, 112)).save(home/'digit.png')
    # the two predictions are independent: at the same time (the pipeline's stages ran above, one by one; its own
    # run is tested in a checkout, tests/test_evaluation.py, and in DEPLOYMENT's commands)
    models = (home/'training_results'/rid/'best.pt', 'models:/digit-recognizer@champion')
    predicted = together(*[lambda m=model: run('digit-predict', 'digit.png', '--model', m, '--format', 'csv')
                           for model in models])
    for p in predicted:
        assert p.stdout.splitlines()[1].startswith('digit.png,'), p.stdout
    for cmd in ('digit-pipeline', 'digit-serve'):
        assert run(cmd, '--help').stdout.startswith(f'usage: {cmd}')
    probs = run("import sys; from digit_recognition.client import DigitPredictor; "
                "p = DigitPredictor.load('models:/digit-recognizer@champion'); "
                "print(p.predict('digit.png').probability)").stdout
    assert 0 < float(probs.split()[-1]) <= 1
    assert not any(home.glob('**/settings.ini'))
