"""The documentation shows what the notebooks promise: every figure cell keeps its picture in git and the rendered
HTML (`jupyter nbconvert`, as a docs build without Quarto would) shows it; measured figures come from
`bench/results/`, not from prose typed by hand."""
import json, re, subprocess
import pytest
from helpers import ROOT, BIN

NOTEBOOKS = sorted((ROOT/'nbs').glob('*.ipynb'))
# A cell that draws: calls one of our plotting helpers or matplotlib directly.
DRAWS = re.compile(r'^(?!\s*#).*\b(plot_\w+|show_(?!settings)\w+|plt\.(subplots|imshow|figure))\(', re.M)
PNG = re.compile(r'<img [^>]*src="data:image/png;base64,')


def figure_cells(nb):
    "Code cells that promise a picture: they draw (and don't close it), and are neither exported code nor skipped."
    cells = json.loads(nb.read_text())['cells']
    return [c for c in cells if c['cell_type'] == 'code' and DRAWS.search(''.join(c['source']))
            and 'plt.close(' not in ''.join(c['source'])
            and not re.search(r'^#\|\s*(export|eval:\s*false|hide)', ''.join(c['source']), re.M)]


def has_png(c): return any('image/png' in o.get('data', {}) for o in c.get('outputs', []))


@pytest.fixture(scope='module')
def html(tmp_path_factory):
    "Every notebook that draws rendered to HTML by nbconvert, without executing it: {name: html}."
    d, drawing = tmp_path_factory.mktemp('html'), [nb for nb in NOTEBOOKS if figure_cells(nb)]
    r = subprocess.run([str(BIN/'jupyter'), 'nbconvert', '--to', 'html', '--output-dir', str(d), '--log-level', 'WARN',
                        *map(str, drawing)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {nb.name: (d/nb.with_suffix('.html').name).read_text() for nb in drawing}


def test_the_notebooks_promise_figures():
    "The check below is not empty: the notebooks do draw (data, model, training, evaluation, client)."
    drawn = {nb.name for nb in NOTEBOOKS if figure_cells(nb)}
    assert {'02_data.ipynb', '05_training.ipynb', '06_evaluation.ipynb', '07_client.ipynb'} <= drawn, drawn


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.name)
def test_figures_are_kept_and_rendered(nb, html):
    cells = figure_cells(nb)
    missing = [''.join(c['source']).splitlines()[0] for c in cells if not has_png(c)]
    assert not missing, f"{nb.name}: figure cells without their picture (run `make docs-outputs`): {missing}"
    if cells: assert len(PNG.findall(html[nb.name])) >= len(cells), f"{nb.name}: the rendered page lacks pictures"


# Measured numbers that prose must not carry by hand: percentages with decimals, speed-ups, seconds, images/s, ECE.
MEASURED = re.compile(r'\b\d{2}\.\d{1,2}%|\b\d+(\.\d+)?x\b(?!\d)|\b\d+(\.\d+)? ?(s|ms)\b(?![-\w])'
                      r'|ECE (of )?(about )?0\.\d|[\d,]+ images/s')


def test_measured_figures_come_from_bench_results():
    typed = []
    for nb in NOTEBOOKS:
        for c in json.loads(nb.read_text())['cells']:
            if c['cell_type'] == 'markdown':
                typed += [f"{nb.name}: {m.group(0)!r}" for m in MEASURED.finditer(''.join(c['source']))]
    assert not typed, "measured figures typed in prose (quote bench/results/ instead): " + ', '.join(typed)
    readers = [nb.name for nb in NOTEBOOKS if "bench/results" in nb.read_text()]
    assert {'05_training.ipynb', '07_client.ipynb', 'index.ipynb'} <= set(readers), readers
    for f in ('train_speed', 'client_speed'):
        r = json.loads((ROOT/'bench'/'results'/f'{f}.json').read_text())
        assert r['date'] and r['machine'] and r['versions'] and r['figures'], f
