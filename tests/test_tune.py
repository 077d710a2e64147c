"""`digit-tune` on the local default storage (training_results/optuna.db, no server): a tiny study whose second trial
(a learning rate too small to learn anything) is pruned by the median pruner and recorded as such in Optuna and in
MLflow; the parent run holds the table, the best parameters and Optuna's plots. A real study: slow."""
import json, re
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def study(tmp_path_factory, run_cli, data_ready):
    d = tmp_path_factory.mktemp('tune')
    env = {'MLFLOW_TRACKING_URI': f"sqlite:///{d/'mlflow.db'}", 'DIGIT_PATHS_RESULTS_DIR': str(d/'results'),
           'MLFLOW_TRACKING_USERNAME': None, 'MLFLOW_TRACKING_PASSWORD': None, 'DIGIT_TUNE_STORAGE': None,
           'DIGIT_TUNE_STARTUP_TRIALS': '1'}                  # the median is one finished trial's
    r = run_cli('digit-tune', '--study', 'tiny', '--trials', '2', '--space', 'lr = float 0.00001 0.05 log',
                '--try', 'lr=0.02', '--try', 'lr=0.00001', '--epochs', '2', '--max-train-samples', '500',
                '--batch-size', '100', '--no-augment', '--no-tta', env=env)
    return r, env, d


def test_a_hopeless_trial_is_pruned(study, run_cli):
    import mlflow, optuna
    r, env, d = study
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r'^  lr=1e-05: pruned after epoch 1 \(run [0-9a-f]{32}\)$', r.stdout, re.M), r.stdout
    assert (d/'results'/'optuna.db').is_file()                  # the local default storage, beside the runs
    st = optuna.load_study(study_name='tiny', storage=f"sqlite:///{d/'results'/'optuna.db'}")
    states = {t.params['lr']: t.state.name for t in st.trials}
    assert states == {0.02: 'COMPLETE', 0.00001: 'PRUNED'}, states
    pruned = next(t for t in st.trials if t.state.name == 'PRUNED')
    assert list(pruned.intermediate_values) == [1]

    c = mlflow.MlflowClient(env['MLFLOW_TRACKING_URI'])
    exp = c.get_experiment_by_name('digit-recognition')
    parent = c.search_runs([exp.experiment_id], "tags.tune = 'parent'")
    assert len(parent) == 1 and parent[0].data.tags['optuna.study'] == 'tiny'
    pid = parent[0].info.run_id
    children = {ch.data.tags['optuna.trial']: ch for ch in
                c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{pid}'")}
    assert set(children) == {'0', '1'}
    p = children[str(pruned.number)]
    assert p.data.tags.get('pruned') == 'true' and p.info.status == 'FINISHED'
    assert len(c.get_metric_history(p.info.run_id, 'val_accuracy')) == 1              # its metrics so far are kept
    assert 'pruned' not in children[str(1 - pruned.number)].data.tags
    arts = {a.path for a in c.list_artifacts(pid)}
    assert {'comparison.csv', 'comparison.md', 'best_params.json', 'optimization_history.png'} <= arts, arts
    best = json.loads(open(c.download_artifacts(pid, 'best_params.json', str(d))).read())
    assert best['params'] == {'lr': 0.02} and best['run_id'] == parent[0].data.tags['best_run_id']

    out = run_cli('digit-tune', '--best', 'tiny', env=env, check=0).stdout
    assert out.splitlines()[1] == '  lr = 0.02' and 'digit-pipeline --study tiny' in out
