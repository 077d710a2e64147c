"The house style, checked: ruff passes (pyflakes, syntax, 120-character lines) and the notebooks' code fits in 120."
import json, subprocess
from helpers import ROOT, BIN


def test_ruff():
    r = subprocess.run([str(BIN/'ruff'), 'check', '--no-cache', 'digit_recognition', 'tests', 'bench'], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


def test_notebook_code_lines_fit():
    "The notebooks are the source: their code lines are at most 120 characters (nbdev then writes the modules)."
    long = [f"{nb.name}: {line[:60]}..." for nb in sorted((ROOT/'nbs').glob('*.ipynb'))
            for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code'
            for line in ''.join(c['source']).splitlines() if len(line) > 120]
    assert long == [], long
