"Shared fixtures: the project root, the canonical MNIST folder, and a runner for the console scripts."
import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope='session')
def mnist_dir():
    "A folder holding the four MNIST files: MNIST_DIR (tests and CI), else the project's verified copy."
    if os.environ.get('MNIST_DIR'): return Path(os.environ['MNIST_DIR'])
    from digit_recognition.data import fetch_mnist, raw_dir
    from digit_recognition.config import Settings
    fetch_mnist()
    return raw_dir(Settings().path('paths', 'data_dir'))


@pytest.fixture
def run_cli(tmp_path):
    "Run a console script from the project root with extra environment; returns the CompletedProcess."
    def run(cmd, *args, env=None, timeout=600, check=None):
        e = {**os.environ, **(env or {})}
        for k, v in (env or {}).items():
            if v is None: e.pop(k)
        r = subprocess.run([str(BIN/cmd), *map(str, args)], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
        if check is not None: assert r.returncode == check, f"{cmd} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r
    return run
