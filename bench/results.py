"""Benchmark results, recorded: `save` writes bench/results/<name>.json and .md (date, machine, versions, command,
table, notes and `figures`, the named numbers prose quotes); `load` reads the json back.

    from bench.results import load                       # from the project folder (or read the json directly)
    load('train_speed')['figures']['speedup']
"""
import datetime, json, os, platform, subprocess, sys
from importlib.metadata import version, PackageNotFoundError
from pathlib import Path

RESULTS = Path(__file__).parent/'results'


def _cpu_model():
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): return platform.processor() or 'unknown'


def _ram_gib():
    try: kb = next(int(l.split()[1]) for l in open('/proc/meminfo') if l.startswith('MemTotal'))
    except (OSError, StopIteration): return None
    return round(kb/2**20, 1)


def machine() -> dict:
    "Platform, CPU model, cores, RAM (GiB), the torch threads and the GPU (if CUDA sees one)."
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(platform=platform.platform(), cpu=_cpu_model(), cores=os.cpu_count(), ram_gib=_ram_gib(),
                torch_threads=torch.get_num_threads(), gpu=gpu)


def git_commit(root=Path(__file__).parent.parent) -> str:
    "The project's git commit (the library's `git_commit`), with '-dirty' when tracked files have changes."
    from digit_recognition.tracking import git_commit as commit
    c = commit(root)
    try: dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError): dirty = ''
    return c + ('-dirty' if dirty and c != 'unknown' else '')


def versions() -> dict:
    "Python, torch, torchvision, numpy, digit_recognition, the git commit and onnxruntime (if installed)."
    import numpy, torch, torchvision, digit_recognition
    v = dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
             numpy=numpy.__version__, digit_recognition=digit_recognition.__version__, git=git_commit())
    for d in ('onnxruntime', 'onnxruntime-gpu'):
        try: v['onnxruntime'] = version(d); break
        except PackageNotFoundError: pass
    return v


def table(columns, rows) -> str:
    "A Markdown table; `rows` are sequences of cells in the order of `columns`."
    line = lambda r: '| ' + ' | '.join(map(str, r)) + ' |'
    return '\n'.join([line(columns), '|' + '---|'*len(columns), *map(line, rows)])


def save(name, rows, columns, notes=(), figures=None) -> Path:
    "Write bench/results/<name>.json and .md; returns the json's path."
    notes = [notes] if isinstance(notes, str) else list(notes)
    r = dict(name=name, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
             machine=machine(), versions=versions(), command=sys.argv, columns=list(columns),
             rows=[dict(zip(columns, row)) for row in rows], notes=notes, figures=dict(figures or {}))
    RESULTS.mkdir(exist_ok=True)
    (p := RESULTS/f'{name}.json').write_text(json.dumps(r, indent=2) + '\n')
    m, v = r['machine'], r['versions']
    head = (f"{name}, {r['date']} on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, "
            f"{m['ram_gib']} GiB{', ' + m['gpu'] if m['gpu'] else ''}; {m['platform']}); "
            + ', '.join(f'{k} {x}' for k, x in v.items()))
    p.with_suffix('.md').write_text('\n\n'.join([head, table(columns, rows), *notes]) + '\n')
    print(f"\nwritten {p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p} and .md")
    return p


def load(name) -> dict:
    "The recorded result `name` (e.g. 'train_speed'): the dict `save` wrote."
    return json.loads((RESULTS/f'{name}.json').read_text())
