"""Loading a registered model never runs pickle (issue 10): the logged model is a weights-only checkpoint, a model
logged before that change (a pickled module) is read by torch's weights-only unpickler, and a file that would need
real pickle is refused by `DigitPredictor.load`, `digit-predict` and `digit-evaluate` without running its payload.
Also: `digit-evaluate` on a checkpoint outside the project writes nothing beside it.
Each test starts a dozen processes and papermill evaluations: all are marked slow."""
import json, os, shutil
from pathlib import Path
import numpy as np
import pytest
import torch
from helpers import together

NAME = 'digit-recognizer'
pytestmark = pytest.mark.slow


class Evil:
    "A pickle payload: loading it with real pickle runs `command` (here, creating a marker file)."
    def __init__(self, command): self.command = command
    def __reduce__(self): return (os.system, (self.command,))


def poison(path:Path, marker:Path):
    "Replace the weights file at `path` by a pickle that would create `marker` if anything unpickled it."
    assert path.is_file(), path
    torch.save(Evil(f"touch {marker}"), path)


def one_line(stderr:str) -> str:
    "The one line a command wrote to stderr (and no traceback)."
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in stderr, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope='module')
def checkpoint(checkpoint_dir):
    "The session's small checkpoint (conftest.checkpoint_dir); beside it 64 test images (images.npy) and digit.png."
    return checkpoint_dir/'best.pt'


LOG = """
import json, sys, mlflow
from pathlib import Path
from digit_recognition.mlmodel import log_model
from digit_recognition.training import model_from_checkpoint, load_checkpoint
from digit_recognition.calibration import Probabilities
from digit_recognition.data import load_cleaned
store, ck = Path(sys.argv[1]), sys.argv[2]
mlflow.set_tracking_uri(f"sqlite:///{store/'mlflow.db'}")
mlflow.create_experiment('safety', artifact_location=(store/'artifacts').as_uri())   # not the project's mlruns/
mlflow.set_experiment('safety')
c, out = mlflow.MlflowClient(), {}
with mlflow.start_run():              # today's model: a weights-only checkpoint
    new = log_model(ck, load_cleaned(splits=('val',)).val[0][:1])
with mlflow.start_run():              # a model as logged before the change: a pickled module
    state = load_checkpoint(ck)
    state['params']['tta'] = False    # the network in one pass: one-pixel shifts came after
    net = Probabilities(model_from_checkpoint(state))
    del net.temperature               # as pickled before calibration existed: the attribute was not there yet
    old = mlflow.pytorch.log_model(net, name='model', serialization_format='pickle')
for alias, info in (('champion', new), ('legacy', old)):
    v = mlflow.register_model(info.model_uri, 'digit-recognizer')
    c.set_registered_model_alias('digit-recognizer', alias, v.version)
    out[alias] = {'dir': c.get_model_version_download_uri('digit-recognizer', v.version), 'run_id': v.run_id}
print(json.dumps(out))
"""


@pytest.fixture(scope='module')
def store(tmp_path_factory, checkpoint, run_cli):
    """A throwaway sqlite store with `digit-recognizer` registered twice: @champion (logged by `log_model`) and
    @legacy (logged the old way, a pickled module); the environment that points the commands at it."""
    d = tmp_path_factory.mktemp('store')
    (d/'results').mkdir()      # empty: no local best.pt of the runs, so the registry's own files are what loads
    env = {'MLFLOW_TRACKING_URI': f"sqlite:///{d/'mlflow.db'}", 'DIGIT_PATHS_RESULTS_DIR': str(d/'results'),
           'MLFLOW_TRACKING_USERNAME': None, 'MLFLOW_TRACKING_PASSWORD': None}
    r = run_cli('python', '-c', LOG, d, checkpoint, env=env, check=0)
    logged = json.loads(r.stdout.splitlines()[-1])
    models = {k: {**v, 'dir': Path(v['dir'].removeprefix('file://'))} for k, v in logged.items()}
    for v in models.values(): assert v['dir'].is_relative_to(d/'artifacts'), v
    return env, models, d


LOAD = """
import json, sys, numpy as np
from digit_recognition.client import DigitPredictor
from digit_recognition.config import DigitError
try: p = DigitPredictor.load(sys.argv[1])
except DigitError as e: print(json.dumps({'error': str(e)})); sys.exit()
print(json.dumps({'model': type(p.model).__name__, 'probabilities': p.probabilities(np.load(sys.argv[2])).tolist()}))
"""


def load(run_cli, env, source, images):
    "What `DigitPredictor.load(source)` gives in a fresh process: {'model', 'probabilities'} or {'error'}."
    return json.loads(run_cli('python', '-c', LOAD, source, images, env=env, check=0).stdout.splitlines()[-1])


def checkpoint_probabilities(checkpoint, calibrated=True):
    "The checkpoint's answers on its images.npy: as every consumer answers, or as a legacy model (T = 1, one pass)."
    from digit_recognition.calibration import probabilities_from_checkpoint
    from digit_recognition.model import ShiftAveraged
    with torch.no_grad():
        x = torch.from_numpy(np.load(checkpoint.parent/'images.npy').astype(np.float32)/255)
        net = probabilities_from_checkpoint(checkpoint)
        assert isinstance(net.model, ShiftAveraged)       # the session's checkpoint answers over shifts (tta)
        if not calibrated: net.temperature, net.model = 1.0, net.model.model
        return net(x).numpy()


def refused(run_cli, env, uri, checkpoint, what):
    "`DigitPredictor.load`, `digit-predict` and `digit-evaluate` each refuse `uri` with one line about `what`."
    loaded, predicted, evaluated = together(                 # three independent processes, at the same time
        lambda: load(run_cli, env, uri, checkpoint.parent/'images.npy'),
        lambda: run_cli('digit-predict', '--model', uri, checkpoint.parent/'digit.png', env=env, check=1),
        lambda: run_cli('digit-evaluate', uri, '--no-register', env=env, check=1))
    error = loaded.get('error', '')
    assert error.startswith(f"model: {uri}: {what} is not a plain weights file"), error
    assert 'it would need pickle to load' in error and '\n' not in error
    r = predicted
    assert one_line(r.stderr) == f"error: {error}" and r.stdout == ''
    r = evaluated
    line = one_line(r.stderr)
    assert line.startswith(f"error: model: {uri}: {what} is not a plain weights file"), line
    assert 'it would need pickle to load' in line


def test_registered_model_is_weights_only_and_a_poisoned_one_is_refused(store, checkpoint, run_cli):
    env, models, d = store
    uri, files = f'models:/{NAME}@champion', models['champion']['dir']
    # What was logged: MLflow's model files, our code, and the checkpoint; no pickle anywhere.
    assert (files/'artifacts'/'best.pt').is_file()
    assert not [p for p in files.rglob('*') if p.suffix in ('.pkl', '.pickle', '.pth')]
    # (a) it loads, and reads images as the checkpoint does.
    r, predicted = together(lambda: load(run_cli, env, uri, checkpoint.parent/'images.npy'),
                            lambda: run_cli('digit-predict', '--model', uri, checkpoint.parent/'digit.png',
                                            '--format', 'json', env=env, check=0))
    assert r.get('model') == 'Probabilities', r
    np.testing.assert_allclose(r['probabilities'], checkpoint_probabilities(checkpoint), atol=1e-6)
    r = predicted
    assert json.loads(r.stdout)[0]['digit'] in range(10)
    # (b) its checkpoint replaced by a pickle that runs a command: refused everywhere, and the command never runs.
    marker = d/'MARKER-champion'
    poison(files/'artifacts'/'best.pt', marker)
    refused(run_cli, env, uri, checkpoint, 'artifacts/best.pt')
    r = run_cli('python', '-c', f"import mlflow; mlflow.pyfunc.load_model({uri!r})", env=env)   # as a server would
    assert r.returncode == 1 and 'not a readable checkpoint' in r.stderr
    assert not marker.exists()
    # The payload is real: torch's full unpickler (what MLflow's pytorch flavour used) runs it.
    run_cli('python', '-c', f"import torch; torch.load({str(files/'artifacts'/'best.pt')!r}, weights_only=False)")
    assert marker.exists()


def test_models_registered_before_the_change_still_load_weights_only(store, checkpoint, run_cli):
    env, models, d = store
    uri, files = f'models:/{NAME}@legacy', models['legacy']['dir']
    assert (files/'data'/'model.pth').is_file()
    # (c) it loads (our layer classes only, no pickle), reads images as the checkpoint does, and evaluates.
    r, evaluated = together(lambda: load(run_cli, env, uri, checkpoint.parent/'images.npy'),
                            lambda: run_cli('digit-evaluate', uri, '--no-register', '--min-accuracy', '0', '--quiet',
                                            env=env))
    assert r.get('model') == 'Probabilities', r
    np.testing.assert_allclose(r['probabilities'], checkpoint_probabilities(checkpoint, calibrated=False), atol=1e-6)
    r = evaluated
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((d/'results'/models['legacy']['run_id']/'evaluation'/'metrics.json').read_text())
    assert m['model'] == uri and m['metrics']['accuracy'] > 0.5
    # Poisoned: refused everywhere, and the command never runs.
    marker = d/'MARKER-legacy'
    poison(files/'data'/'model.pth', marker)
    refused(run_cli, env, uri, checkpoint, 'data/model.pth')
    assert not marker.exists()
    # The payload is real: MLflow's own pytorch loader (what `load_model` called before the change) runs it.
    run_cli('python', '-c', f"import mlflow; mlflow.pytorch.load_model({uri!r})", env=env)
    assert marker.exists()


def test_evaluating_a_checkpoint_outside_the_project_writes_nothing_beside_it(checkpoint, tmp_path, run_cli):
    outside = tmp_path/'downloads'; outside.mkdir()
    shutil.copy(checkpoint, outside/'best.pt')
    env = {'MLFLOW_TRACKING_URI': f"sqlite:///{tmp_path/'mlflow.db'}", 'MLFLOW_TRACKING_USERNAME': None,
           'MLFLOW_TRACKING_PASSWORD': None, 'DIGIT_PATHS_RESULTS_DIR': str(tmp_path/'results')}
    r = run_cli('digit-evaluate', outside/'best.pt', '--no-register', '--min-accuracy', '0', '--quiet', env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in outside.iterdir()) == ['best.pt']
    found = list((tmp_path/'results'/'checkpoints').glob('best-*/evaluation/metrics.json'))
    assert len(found) == 1 and str(found[0].parent) in r.stdout
    m = json.loads(found[0].read_text())
    assert m['model'] == str(outside/'best.pt') and m['n_images'] > 0
