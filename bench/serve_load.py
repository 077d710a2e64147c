"""Load on the HTTP server: `digit-serve` under concurrent clients on loopback, against its targets, and (for
comparison) `mlflow models serve` answering the same images as tensors.

Each scenario starts its server as a subprocess on a free port, waits until it is ready, then N clients (--clients,
default 8) send requests back to back on persistent keep-alive connections for a bounded time (--seconds, after
--warmup seconds not counted), and the server is stopped:
  digit-serve                  POST /predict, one PNG photo in a multipart form (`file`); every answer written to
                               the prediction log (SQLite in a temporary folder)
  digit-serve, no log          the same with the prediction log off (`--prediction-log ''`): the log's cost
  digit-serve, batch           POST /predict/batch, --batch PNG photos in one multipart form (`files`)
  digit-serve, workers         POST /predict, one PNG photo, `digit-serve --workers 2`
  mlflow models serve          POST /invocations, {"inputs": [28x28 array]}: the same photo as the client sends it
  mlflow models serve, batch   POST /invocations, --batch of them in one request
The photos are MNIST test digits rendered by `images.render_photo` (dark ink on uneven paper, off-centre, rotated,
blurred; 136 to 160 pixels square) and encoded as PNG; the tensors are the same photos read by `images.to_mnist`
(28x28 in 0..1), as `digit-predict --server` posts them. All requests are built in memory before the clock starts.
An error is a failed connection, an answer other than 200, or a 200 without an answer for each image (a digit or the
reason for none; for MLflow, ten probabilities). Targets (digit-serve, single images, one worker, on a 2-core
machine): at least 300 requests/s, p99 latency under 50 ms, no errors; the prediction log costs at most 10% of the
requests/s (serve against serve-nolog).

    python bench/serve_load.py                          # the champion, 8 clients, 20 s per scenario
    python bench/serve_load.py --model <run id> --clients 16 --seconds 60
    python bench/serve_load.py --parts serve,mlflow     # some of: serve, serve-nolog, serve-batch, serve-workers,
                                                        # mlflow, mlflow-batch
    python bench/serve_load.py --quick                  # smoke run: 3 s per scenario

The load generator is one asyncio process that writes HTTP/1.1 by hand (pre-built requests, Content-Length answers)
so that it takes little of the CPU the server needs; its CPU use and the server's are listed. The table, with date,
machine and versions, goes to bench/results/serve_load.json and .md (a --quick run's to serve_load-quick.*); its
`figures` are what the notebooks and README quote.
"""
import argparse, asyncio, io, json, os, signal, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path
import numpy as np
from digit_recognition.config import Settings, tracking_uri
from digit_recognition.data import load_cleaned
from digit_recognition.images import render_photo, to_mnist
from digit_recognition.tracking import RUN_ID
from results import save, table

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TARGET_RPS, TARGET_P99_MS = 300, 50
PARTS = ('serve', 'serve-nolog', 'serve-batch', 'serve-workers', 'mlflow', 'mlflow-batch')
MAX_LOG_COST = 0.10
BOUNDARY = b'digit-bench-7d1f0c9a4e2b4f6a8c3d5e7f9a1b3c5d'


def photos(n:int) -> tuple:
    "`(PNG bytes, 28x28 float arrays in 0..1, labels)` of `n` test digits rendered as photos (seeded)."
    x, y = load_cleaned(splits=('test',)).test
    x, y = x.squeeze(1).numpy(), y.numpy()
    pngs, arrays = [], []
    for i in range(n):
        im = render_photo(x[i], seed=i, size=136 + 8*(i % 4))
        buf = io.BytesIO(); im.convert('L').save(buf, 'PNG'); pngs.append(buf.getvalue())
        arrays.append(to_mnist(im).astype(np.float32)/255)
    return pngs, arrays, y[:n].tolist()


def http_post(path:str, ctype:str, body:bytes, port:int) -> bytes:
    "One HTTP/1.1 keep-alive POST request, head and body."
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode() + body


def multipart(field:str, files:list) -> tuple:
    "`(content type, body)` of a multipart form with `files` (`(name, PNG bytes)`) in `field`."
    parts = [b'--' + BOUNDARY + b'\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n'
             b'Content-Type: image/png\r\n\r\n' % (field.encode(), name.encode()) + data + b'\r\n'
             for name, data in files]
    return f"multipart/form-data; boundary={BOUNDARY.decode()}", b''.join(parts) + b'--' + BOUNDARY + b'--\r\n'


def requests(kind:str, batch:int, pngs:list, arrays:list, labels:list, port:int) -> list:
    "`[(request bytes, labels of its images)]` for a scenario `kind` ('serve...' or 'mlflow...'), one per start image."
    n, size = len(pngs), batch if kind.endswith('batch') else 1
    groups = [[(i + j) % n for j in range(size)] for i in range(0, n, size)]
    out = []
    for g in groups:
        if kind.startswith('mlflow'):
            body = json.dumps({'inputs': np.stack([arrays[i] for i in g]).tolist()}).encode()
            req = http_post('/invocations', 'application/json', body, port)
        else:
            ctype, body = multipart('files' if size > 1 else 'file', [(f"digit{i:04d}.png", pngs[i]) for i in g])
            req = http_post('/predict/batch' if size > 1 else '/predict', ctype, body, port)
        out.append((req, [labels[i] for i in g]))
    return out


def answers(kind:str, body:bytes, n:int) -> list|None:
    "The digits answered (None: not sure) for `n` images, or None when the answer is not one for each image."
    try: j = json.loads(body)
    except ValueError: return None
    if kind.startswith('mlflow'):
        p = j.get('predictions') if isinstance(j, dict) else j
        if not isinstance(p, list) or len(p) != n or any(len(r) != 10 for r in p): return None
        return [int(np.argmax(r)) for r in p]
    rs = j.get('results') if n > 1 else [j]
    if not isinstance(rs, list) or len(rs) != n: return None
    if not all(isinstance(r, dict) and (r.get('digit') is not None or r.get('reason')) for r in rs): return None
    return [r['digit'] for r in rs]


async def read_response(reader) -> tuple:
    "`(status, body, keep-alive)` of one HTTP/1.1 response (Content-Length or chunked)."
    lines = (await reader.readuntil(b'\r\n\r\n')).split(b'\r\n')
    status = int(lines[0].split()[1])
    h = {k.strip().lower(): v.strip().lower() for k, _, v in (l.partition(b':') for l in lines[1:] if l)}
    if b'content-length' in h: body = await reader.readexactly(int(h[b'content-length']))
    elif h.get(b'transfer-encoding') == b'chunked':
        body = b''
        while (size := int((await reader.readline()).split(b';')[0], 16)):
            body += await reader.readexactly(size); await reader.readexactly(2)
        await reader.readuntil(b'\r\n')
    else: return status, await reader.read(), False
    return status, body, h.get(b'connection') != b'close'


class Tally:
    "What the clients saw in the timed window: latencies, images, right answers, errors (and a few of them)."
    def __init__(self): self.latency, self.images, self.right, self.errors, self.examples = [], 0, 0, 0, []
    def error(self, what:str):
        self.errors += 1
        if len(self.examples) < 3: self.examples.append(what[:200])


async def client(port:int, kind:str, reqs:list, start:int, warm:float, end:float, t:Tally):
    "Send `reqs` (from `start`, round) back to back on one keep-alive connection until `end`; count from `warm`."
    writer, i = None, start
    while time.perf_counter() < end:
        req, labels = reqs[i % len(reqs)]; i += 1
        err = None
        try:
            if writer is None: reader, writer = await asyncio.open_connection('127.0.0.1', port)
            t0 = time.perf_counter()
            writer.write(req)
            status, body, keep = await read_response(reader)
            got = answers(kind, body, len(labels)) if status == 200 else None
            if got is None: err = f"HTTP {status}: {body[:160].decode(errors='replace')}"
            if not keep: writer.close(); writer = None
        except (OSError, EOFError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            err, t0 = f"{type(e).__name__}: {e}", None
            if writer is not None: writer.close(); writer = None
        done = time.perf_counter()
        if warm <= done <= end:
            if t0 is not None: t.latency.append(done - t0)      # answered (any status), not a failed connection
            if err: t.error(err)
            else: t.images += len(labels); t.right += sum(d == y for d, y in zip(got, labels))
        if t0 is None: await asyncio.sleep(0.05)    # a refused connection must not spin
    if writer is not None: writer.close()


async def load(port:int, kind:str, reqs:list, clients:int, warmup:float, seconds:float) -> Tally:
    "Run `clients` clients for `warmup` + `seconds` seconds; the tally of the last `seconds`."
    t, now = Tally(), time.perf_counter()
    warm, end = now + warmup, now + warmup + seconds
    step = max(1, len(reqs)//clients)
    tasks = [asyncio.create_task(client(port, kind, reqs, k*step, warm, end, t)) for k in range(clients)]
    done, stuck = await asyncio.wait(tasks, timeout=warmup + seconds + 30)
    for s in stuck: s.cancel(); t.error('no answer within 30 s of the end')
    for d in done:
        if d.exception(): t.error(f"client crashed: {d.exception()!r}")
    return t


def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def cpu_seconds(pid:int) -> float:
    "CPU seconds used so far by process `pid` and its children (uvicorn's workers); 0 without psutil."
    try: import psutil
    except ImportError: return 0.0
    try:
        ps = [psutil.Process(pid)]; ps += ps[0].children(recursive=True)
    except psutil.Error: return 0.0
    total = 0.0
    for p in ps:
        try: c = p.cpu_times(); total += c.user + c.system
        except psutil.Error: pass
    return total


class Server:
    "A server subprocess on `port`, started on `with` and ready when `ready_path` answers 200; stopped on exit."
    def __init__(self, cmd:list, port:int, ready_path:str, env:dict, cwd:Path, log:Path, name:str):
        self.cmd, self.port, self.ready_path, self.env, self.cwd, self.log, self.name = \
            cmd, port, ready_path, env, cwd, log, name
    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=open(self.log, 'w'),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        url, t0 = f"http://127.0.0.1:{self.port}{self.ready_path}", time.perf_counter()
        while time.perf_counter() - t0 < 180:
            if self.proc.poll() is not None: self._fail(f"exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200: self.start_s = time.perf_counter() - t0; return self
            except OSError: pass
            time.sleep(0.2)
        self._fail("not ready within 180 s")
    def _fail(self, why:str):
        self.__exit__()
        tail = self.log.read_text(errors='replace').strip().splitlines()[-15:]
        sys.exit(f"{self.name} {why}: {' '.join(self.cmd)}\n" + '\n'.join(tail))
    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()
            try: self.proc.wait(30)
            except subprocess.TimeoutExpired: os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait()


def mlflow_uri(model:str) -> str|None:
    "What `mlflow models serve -m` takes for the model digit-serve serves: a models:/ URI, or its run's logged model."
    if model.startswith(('models:/', 'runs:/')): return model
    if RUN_ID.match(model): return f"runs:/{model}/model"
    p = Path(model)
    run = next((d.name for d in (p, p.parent) if RUN_ID.match(d.name)), None)
    return run and f"runs:/{run}/model"


def scenario(part:str, a, model:str, mlflow_model:str, env:dict, d:Path, data:tuple) -> dict:
    "Start the server of `part`, load it, stop it: the scenario's measures."
    port, batch = free_port(), a.batch if part.endswith('batch') else 1
    if part.startswith('mlflow'):
        cmd = [str(BIN/'mlflow'), 'models', 'serve', '-m', mlflow_model, '--env-manager', 'local',
               '-h', '127.0.0.1', '-p', str(port)]
        server, ready = 'mlflow models serve', '/ping'
    else:
        workers = a.workers if part == 'serve-workers' else 1
        log = '' if part == 'serve-nolog' else str(d/f"{part}-predictions.db")
        cmd = [str(BIN/'digit-serve'), '--model', model, '--host', '127.0.0.1', '--port', str(port),
               '--workers', str(workers), '--no-access-log', '--prediction-log', log]
        server = f"digit-serve{f' --workers {workers}' if workers > 1 else ''}{', no log' if not log else ''}"
        ready = '/ready'
    reqs = requests(part, batch, *data, port)
    with Server(cmd, port, ready, env, ROOT if part.startswith('serve') else d, d/f"{part}.log", server) as s:
        cpu0, own0, t0 = cpu_seconds(s.proc.pid), time.process_time(), time.perf_counter()
        t = asyncio.run(load(port, part, reqs, a.clients, a.warmup, a.seconds))
        wall = time.perf_counter() - t0
        cpu, own = cpu_seconds(s.proc.pid) - cpu0, time.process_time() - own0
    lat = 1000*np.asarray(t.latency or [np.nan])
    n = len(t.latency)
    r = dict(part=part, server=server, images_per_request=batch, clients=a.clients, seconds=a.seconds, requests=n,
             requests_per_s=n/a.seconds, images_per_s=t.images/a.seconds, errors=t.errors,
             p50_ms=float(np.percentile(lat, 50)), p95_ms=float(np.percentile(lat, 95)),
             p99_ms=float(np.percentile(lat, 99)), max_ms=float(lat.max()),
             accuracy=t.right/t.images if t.images else None, server_cpu=cpu/wall, client_cpu=own/wall,
             start_s=s.start_s, request_bytes=int(np.mean([len(q) for q, _ in reqs])), error_examples=t.examples)
    print(f"{server:28} {batch:>2} image(s)/request: {r['requests_per_s']:7.1f} req/s, {r['images_per_s']:7.1f} "
          f"images/s, p50 {r['p50_ms']:.1f} p95 {r['p95_ms']:.1f} p99 {r['p99_ms']:.1f} ms, {t.errors} errors",
          flush=True)
    for e in t.examples: print(f"    error: {e}")
    return r


def status(r:dict) -> tuple:
    "`(target, status)` of a scenario: the targets hold for digit-serve's single images."
    if r['part'] not in ('serve', 'serve-workers', 'serve-nolog'):
        return ('0 errors', 'met' if r['errors'] == 0 else 'NOT met')
    miss = [w for w, ok in ((f"{r['requests_per_s']:.0f} req/s", r['requests_per_s'] >= TARGET_RPS),
                            (f"p99 {r['p99_ms']:.1f} ms", r['p99_ms'] < TARGET_P99_MS),
                            (f"{r['errors']} errors", r['errors'] == 0)) if not ok]
    return (f">= {TARGET_RPS} req/s, p99 < {TARGET_P99_MS} ms, 0 errors",
            'met' if not miss else 'NOT met (' + ', '.join(miss) + ')')


def stack() -> str:
    "The servers' software: versions of MLflow, uvicorn, FastAPI, and which of uvicorn's fast parts are installed."
    from importlib.metadata import version, PackageNotFoundError
    import importlib.util
    def v(d):
        try: return version(d)
        except PackageNotFoundError: return 'not installed'
    fast = [m for m in ('httptools', 'uvloop') if importlib.util.find_spec(m)]
    return (f"MLflow {v('mlflow')}, uvicorn {v('uvicorn')}, FastAPI {v('fastapi')}, Starlette {v('starlette')}; "
            f"uvicorn's HTTP parser: {'httptools' if 'httptools' in fast else 'h11 (pure Python)'}, event loop: "
            f"{'uvloop' if 'uvloop' in fast else 'asyncio'}.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default=None, help="what digit-serve serves: a models:/ URI, run id, run folder or "
                    "checkpoint (default: [serve] model, else the champion); MLflow serves the same registered model, "
                    "or the run's logged model")
    ap.add_argument('--parts', default=','.join(PARTS), help="scenarios, comma-separated (default: %(default)s)")
    ap.add_argument('--clients', type=int, default=8, help="concurrent clients (default: %(default)s)")
    ap.add_argument('--seconds', type=float, default=20, help="timed seconds per scenario (default: %(default)s)")
    ap.add_argument('--warmup', type=float, default=2, help="seconds of load before the clock starts "
                    "(default: %(default)s)")
    ap.add_argument('--batch', type=int, default=16, help="images per batch request (default: %(default)s)")
    ap.add_argument('--workers', type=int, default=2, help="digit-serve's processes in serve-workers "
                    "(default: %(default)s)")
    ap.add_argument('--images', type=int, default=200, help="photos in the pool the requests cycle through "
                    "(default: %(default)s)")
    ap.add_argument('--quick', action='store_true', help="smoke run (3 s per scenario, 1 s warm-up) written to "
                    "bench/results/serve_load-quick.*")
    a = ap.parse_args()
    if a.quick: a.seconds, a.warmup = min(a.seconds, 3), min(a.warmup, 1)
    parts = [p.strip() for p in a.parts.split(',') if p.strip()]
    if bad := [p for p in parts if p not in PARTS]: sys.exit(f"--parts: unknown {', '.join(bad)} "
                                                             f"(expected some of {', '.join(PARTS)})")
    s = Settings()
    model = a.model or s.get('serve', 'model') or f"models:/{s.get('mlflow', 'registered_model')}@champion"
    mlflow_model = mlflow_uri(model)
    if any(p.startswith('mlflow') for p in parts) and not mlflow_model:
        print(f"{model}: not a registered or logged MLflow model: the mlflow models serve scenarios are left out")
        parts = [p for p in parts if not p.startswith('mlflow')]
    env = {**os.environ, 'MLFLOW_TRACKING_URI': tracking_uri(s), 'PATH': f"{BIN}:{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter(); data = photos(a.images)
    kb = np.mean([len(p) for p in data[0]])/1000
    print(f"model {model} (MLflow: {mlflow_model}); {a.images} photos as PNG ({kb:.1f} kB on average) and 28x28 "
          f"tensors, made in {time.perf_counter() - t0:.1f} s; {a.clients} clients, {a.warmup:g} s warm-up + "
          f"{a.seconds:g} s per scenario\n", flush=True)
    with tempfile.TemporaryDirectory() as d:
        res = [scenario(p, a, model, mlflow_model, env, Path(d), data) for p in parts]
    cols = ['server', 'images/request', 'requests/s', 'images/s', 'p50 ms', 'p95 ms', 'p99 ms', 'errors',
            'server CPU', 'target', 'status']
    rows = [(r['server'], r['images_per_request'], f"{r['requests_per_s']:.1f}", f"{r['images_per_s']:.1f}",
             f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}", r['errors'],
             f"{r['server_cpu']:.0%}", *status(r)) for r in res]
    print('\n' + table(cols, rows))
    figs = {r['part']: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != 'part'}
            for r in res}
    figs.update(target_requests_per_s=TARGET_RPS, target_p99_ms=TARGET_P99_MS, clients=a.clients,
                seconds=a.seconds, warmup=a.warmup, batch=a.batch, images=a.images, png_kb=round(kb, 1),
                model=model, mlflow_model=mlflow_model,
                targets_met=sum(row[-1] == 'met' for row in rows), targets=len(rows))
    by = {r['part']: r for r in res}
    if 'serve' in by and 'serve-nolog' in by:     # the prediction log's cost: requests/s lost with it on
        cost = 1 - by['serve']['requests_per_s']/by['serve-nolog']['requests_per_s']
        figs.update(log_cost=round(cost, 4), max_log_cost=MAX_LOG_COST)
        verdict = 'met' if cost <= MAX_LOG_COST else 'NOT met'
        print(f"the prediction log costs {cost:.1%} of the requests/s (target: at most {MAX_LOG_COST:.0%}): "
              f"{verdict}")
    cpu = ', '.join(f"{r['server']} x{r['images_per_request']}: {r['client_cpu']:.0%}" for r in res)
    notes = [f"model {model}; `mlflow models serve -m {mlflow_model} --env-manager local` (its default settings, "
             "access log included) serves the same model's logged pyfunc, which runs PyTorch; digit-serve runs "
             "the model's ONNX file on ONNX Runtime.",
             f"{a.clients} concurrent clients on loopback, each on one keep-alive HTTP/1.1 connection sending back "
             f"to back; {a.warmup:g} s of warm-up, then {a.seconds:g} s timed per scenario; latency from writing "
             "a request to reading its whole answer. Requests cycle through "
             f"{a.images} MNIST test digits rendered as photos ({kb:.1f} kB PNG on average, 136-160 pixels) for "
             "digit-serve (multipart form), and through the same photos read by `images.to_mnist` (28x28 "
             "in 0..1, as JSON `inputs`) for MLflow: MLflow is spared reading the image.",
             "digit-serve runs with its access log off (`--no-access-log`); MLflow's server with its defaults. "
             "Server CPU: CPU seconds of the server's processes over the scenario's wall time (100% = one core); "
             f"the load generator's own CPU: {cpu}.",
             f"Targets (digit-serve, single images): at least {TARGET_RPS} requests/s with p99 under "
             f"{TARGET_P99_MS} ms and no errors; every scenario: no errors. The answers' top-1 accuracy on the "
             "photos: " + ', '.join(f"{r['server']} x{r['images_per_request']}: "
                                    + (f"{r['accuracy']:.1%}" if r['accuracy'] is not None else 'n/a')
                                    for r in res) + '.']
    if 'log_cost' in figs:
        notes.append(f"The prediction log (SQLite, written in batches by a background thread) costs "
                     f"{figs['log_cost']:.1%} of digit-serve's requests/s (with it: {by['serve']['requests_per_s']:.1f}"
                     f", without: {by['serve-nolog']['requests_per_s']:.1f}); target: at most {MAX_LOG_COST:.0%}.")
    notes.append(stack())
    if a.quick: notes.append("A --quick smoke run (3 s per scenario): not a measurement.")
    save('serve_load-quick' if a.quick else 'serve_load', rows, cols, notes, figs)


if __name__ == '__main__':
    main()
