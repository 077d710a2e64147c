"""What the project's image is made of: its size and each layer's (`docker history`), against the base image it
starts from. Run after the image is built (tests/test_docker.py builds `digit-recognition:test`); writes
bench/results/docker_image.{json,md}.

    python bench/docker_image.py [IMAGE]
"""
import json, re, subprocess, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from results import save

DOCKER = '/usr/bin/docker' if Path('/usr/bin/docker').exists() else 'docker'


def docker(*args) -> str:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, check=True).stdout


def layers(image:str) -> list:
    "(step, MB) of each layer of `image` that holds anything, oldest first."
    out = []
    for l in reversed(docker('history', '--no-trunc', '--human=false', '--format', '{{json .}}', image).splitlines()):
        h = json.loads(l)
        mb = int(h['Size'])/1e6
        step = re.sub(r'^RUN \|\d+ (\S+=\S* )*/bin/sh -c ', 'RUN ', ' '.join(h['CreatedBy'].split()))  # no ARGs
        step = step[:90] or 'the base image (BASE_IMAGE)'
        if mb >= 0.1: out.append((step, round(mb, 1)))
    return out


PARTS = """
import pathlib, site
sp = pathlib.Path(site.getsitepackages()[0])
size = lambda p: sum(f.stat().st_size for f in p.rglob('*') if f.is_file() and not f.is_symlink())
parts = {'nvidia': 0, 'triton': 0, 'torch': 0, 'the rest': 0}
for d in sp.iterdir():
    k = next((k for k in ('nvidia', 'triton', 'torch') if d.name.startswith(k)), 'the rest')
    parts[k] += size(d) if d.is_dir() else d.stat().st_size
print(parts)
"""


def venv_parts(image:str) -> dict:
    "MB of the image's site-packages: NVIDIA's CUDA libraries, triton, torch (and torchvision), the rest."
    import ast
    out = docker('run', '--rm', '--network', 'none', '--entrypoint', 'python', image, '-c', PARTS)
    return {k: round(v/1e6) for k, v in ast.literal_eval(out.strip().splitlines()[-1]).items()}


if __name__ == '__main__':
    image = sys.argv[1] if len(sys.argv) > 1 else 'digit-recognition:test'
    size = lambda i: round(int(docker('image', 'inspect', '--format', '{{.Size}}', i))/1e6)
    rows = layers(image)
    total = size(image)
    venv_mb = round(sum(mb for step, mb in rows if 'pip install' in step), 1)
    parts = venv_parts(image)
    rows += [(f"  of which site-packages: {k}", mb) for k, mb in parts.items()]
    save('docker_image', rows + [('the image, in all', total)], ['layer (the step that made it)', 'MB'],
         notes=[f"`{image}`: {total} MB: the base image, the virtual environment ({venv_mb} MB: torch and "
                "torchvision in a layer of their own, then the project and its dependencies) and a few small files.",
                "Built here with torch from the default package index (its CUDA wheels: download.pytorch.org, the "
                "CPU index, is not reachable from this machine), so the size with CPU wheels is not measured here; "
                f"NVIDIA's libraries and triton, which the CPU wheels do not bring, are "
                f"{parts['nvidia'] + parts['triton']} MB of it."],
         figures={'image_mb': total, 'venv_mb': venv_mb, 'cuda_mb': parts['nvidia'] + parts['triton'], **parts})
