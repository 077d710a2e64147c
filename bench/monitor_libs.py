"""Which library digit-monitor computes its drift statistics with: Evidently (made for drift reports) against scipy
(already installed with the training stack). Each in a fresh environment made by uv: its size on disk, and the time to
import what a report needs, best of three. Writes bench/results/monitor_libs.{json,md}.

    python bench/monitor_libs.py
"""
import shutil, subprocess, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from results import save

UV = Path(sys.executable).parent/'uv'
CANDIDATES = {'evidently': (['evidently', 'pandas<3'], "from evidently import Report; from evidently.presets import "
                            "DataDriftPreset"),            # (pandas 3 breaks evidently's import, 0.7.x)
              'scipy': (['scipy', 'numpy'], "from scipy import stats")}


def measure(packages:list, code:str) -> dict:
    "A fresh environment with `packages`: its MB on disk, and the best of three imports of `code`, in seconds."
    d = Path(tempfile.mkdtemp())
    try:
        subprocess.run([UV, 'venv', '-q', d/'venv'], check=True)
        py = d/'venv'/'bin'/'python'
        subprocess.run([UV, 'pip', 'install', '-q', '--compile-bytecode', '--python', py, *packages], check=True)
        mb = sum(f.stat().st_size for f in (d/'venv').rglob('*') if f.is_file() and not f.is_symlink())/2**20
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([py, '-c', code], check=True)
            times.append(time.perf_counter() - t0)
        version = subprocess.run([py, '-c', f"import importlib.metadata as m; print(m.version({packages[0]!r}))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        return {'version': version, 'mb': round(mb), 'import_s': round(min(times), 2)}
    finally: shutil.rmtree(d, ignore_errors=True)


if __name__ == '__main__':
    res = {k: measure(*v) for k, v in CANDIDATES.items()}
    rows = [(k, r['version'], r['mb'], r['import_s']) for k, r in res.items()]
    save('monitor_libs', rows, ['library', 'version', 'environment MB', 'import s (best of 3)'],
         notes=[f"What a drift report needs imported: {'; '.join(f'{k}: `{v[1]}`' for k, v in CANDIDATES.items())}.",
                "digit-monitor uses scipy (chisquare, ks_2samp) and ten lines for the population stability index: "
                f"{res['evidently']['mb'] - res['scipy']['mb']} MB and "
                f"{res['evidently']['import_s'] - res['scipy']['import_s']:.1f} s of import less per run than "
                "Evidently, for five numbers."],
         figures={k: r for k, r in res.items()})
