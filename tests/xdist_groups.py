"""How `make test` deals the tests to pytest-xdist's workers (a small plugin, its hooks registered by conftest.py).

Under pytest-xdist (`make test` runs `-n 3` where it is installed) tests are dealt to the workers in units: a group
below goes to one worker as a whole, every other test is a unit of its own. A group holds the tests that share what
is expensive to make once per worker (a module fixture, an MLflow server): split, each worker would make it again.
The two MLflow-server groups each start one server; the first also trains the tiny run (`server_run`) and holds
every test that reads it."""
import pytest


GROUPS = {'mlflow-server-a': ('tests/test_training_mlflow.py::test_run_is_recorded',
                              'tests/test_training_mlflow.py::test_logged_model_predicts',
                              'tests/test_training_mlflow.py::test_executed_notebook_and_no_secrets',
                              'tests/test_training_mlflow.py::test_wrong_password_fails_fast_and_keeps_checkpoint',
                              'tests/test_evaluation.py::test_registry_on_the_login_server',
                              'tests/test_client_venv.py::'),                    # and its venv (client_venv)
          'mlflow-server-b': ('tests/test_secrets.py::',
                              'tests/test_training_mlflow.py::test_killed_run_keeps_checkpoint_and_resumes'),
          'sqlite-sweep': ('tests/test_training_mlflow.py::test_sweep_',),           # one digit-sweep --jobs 3
          'wheel': ('tests/test_wheel.py::',),                                          # the built wheel (installed)
          'evaluation-local': ('tests/test_evaluation.py::test_registry_decisions',     # the three tiny models (local)
                               'tests/test_evaluation.py::test_no_register_and_bad_model'),
          'model-store': ('tests/test_model_safety.py::test_registered_model_is_weights_only',   # store
                          'tests/test_model_safety.py::test_models_registered_before_the_change'),
          'interrupted-run': ('tests/test_reliability.py::test_ctrl_c_is_one_line',     # interrupted
                              'tests/test_reliability.py::test_resume_says_what_it_took_the_argument_for'),
          'digit-serve': ('tests/test_serve.py::',),                                   # one digit-serve
          'served-model': ('tests/test_client.py::test_predict_through_a_served_model',  # served
                           'tests/test_client.py::test_served_model_checks_its_input'),
          'postgres': ('tests/test_team.py::test_two_workers_and_a_killed_one',        # PostgreSQL, its MLflow server
                       'tests/test_team.py::test_first_runs_of_a_new_experiment_at_once'),
          'docker': ('tests/test_docker.py::',),                          # one image, one engine
          'docs': ('tests/test_docs.py::',)}                              # every notebook rendered once

SERVER_RUN_GROUP = 'mlflow-server-a'

# The units that take longest (wall time under `make test`), longest first: they start first, so that none of them
# is left running alone at the end. After them come the other tests marked slow, then the rest.
LONGEST = ('docker', 'mlflow-server-b', 'mlflow-server-a', 'postgres',
           'tests/test_deployment.py::test_deployment_commands',
           'tests/test_ddp.py::test_killed_worker_ends_the_run_and_resume_finishes_it',
           'evaluation-local', 'tests/test_evaluation.py::test_pipeline_reuses_current_stages', 'wheel', 'model-store',
           'tests/test_client.py::test_each_kind_of_file')

def group_of(nodeid):
    "The group of test `nodeid`, or None."
    return next((g for g, ps in GROUPS.items() if nodeid.startswith(ps)), None)

def pytest_collection_modifyitems(config, items):
    """Keep GROUPS honest: under xdist a test that uses the server outside a server group would start one more server,
    and one that reads `server_run` outside its group would train it again. Under xdist, slow tests come first."""
    uses = lambda i, f: f in getattr(i, 'fixturenames', ())
    stray = [i.nodeid for i in items if uses(i, 'mlflow_server') and not (group_of(i.nodeid) or '').startswith(
             'mlflow-server') or uses(i, 'server_run') and group_of(i.nodeid) != SERVER_RUN_GROUP]
    if stray: raise pytest.UsageError(f"tests/conftest.py: put these tests in the right group of GROUPS: {stray}")
    if hasattr(config, 'workerinput'):     # slow tests first; those reading the session's checkpoint last, so that the
        items.sort(key=lambda i: (i.get_closest_marker('slow') is None, uses(i, 'checkpoint_dir')))  # others go on
                                               # while one worker trains it (LONGEST starts one of them first)

@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist: each group on one worker; the LONGEST units first, then the others in collection order (slow tests
    first); a worker gets its next unit only when it is down to its last test (the least a worker needs to go on), so
    that the units left go to whichever worker is free first."""
    from xdist.scheduler import LoadScopeScheduling
    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid): return group_of(nodeid) or nodeid
        def _assign_work_unit(self, node):
            first = {u: i for i, u in enumerate(dict.fromkeys(map(self._split_scope, self.collection)))}
            rank = lambda u: (LONGEST.index(u) if u in LONGEST else len(LONGEST), first[u])
            self.workqueue.move_to_end(min(self.workqueue, key=rank), last=False)     # the unit xdist then pops
            super()._assign_work_unit(node)
        def _reschedule(self, node):                                                # xdist's, but `<= 1` (not 2)
            if node.shutting_down: return
            if not self.workqueue: node.shutdown(); return
            if self._pending_of(self.assigned_work[node]) <= 1: self._assign_work_unit(node)
    return Scheduling(config, log)
