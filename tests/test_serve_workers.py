"""`digit-serve --workers 2` shares its connections between its workers: sixteen keep-alive clients that connect at
once (a reverse proxy, a load test) are not all served by the first worker to wake, because each worker listens on a
socket of its own on the port (SO_REUSEPORT, Linux) and the kernel spreads the connections."""
import os, select, socket, subprocess, sys, time
from pathlib import Path
import pytest
from helpers import BIN, free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith('linux'),
                                                   reason="SO_REUSEPORT spreads the connections on Linux")]


def sockets_on(port:int, state:str) -> set:
    "The inodes of this machine's TCP sockets whose local port is `port`, in `state` ('0A' listening, '01' open)."
    found = set()
    for f in ('/proc/net/tcp', '/proc/net/tcp6'):
        for line in Path(f).read_text().splitlines()[1:]:
            p = line.split()
            if int(p[1].rsplit(':', 1)[1], 16) == port and p[3] == state: found.add(p[9])
    return found


def owners(inodes:set) -> dict:
    "{pid: how many of the sockets `inodes` it holds}, read from /proc/PID/fd."
    out = {}
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try: links = [os.readlink(f'/proc/{pid}/fd/{fd}') for fd in os.listdir(f'/proc/{pid}/fd')]
        except OSError: continue
        n = sum(link.startswith('socket:[') and link[8:-1] in inodes for link in links)
        if n: out[int(pid)] = n
    return out


def test_workers_share_the_connections(checkpoint_dir, tmp_path):
    port = free_port()
    with open(tmp_path/'serve.log', 'w') as log:
        p = subprocess.Popen([BIN/'digit-serve', '--model', checkpoint_dir/'model.onnx', '--port', str(port),
                              '--workers', '2', '--prediction-log', ''], cwd=tmp_path, stdout=log,
                             stderr=subprocess.STDOUT, env={**os.environ, 'DIGIT_PATHS_RESULTS_DIR': str(tmp_path)})
    try:
        deadline = time.time() + 180                 # both workers up (the parent's socket is bound, not listening)
        while len(owners(listening := sockets_on(port, '0A'))) < 2:
            assert p.poll() is None and time.time() < deadline, (tmp_path/'serve.log').read_text()[-3000:]
            time.sleep(0.5)
        assert len(listening) == 2 and sorted(owners(listening).values()) == [1, 1], owners(listening)  # one each
        clients = []
        for _ in range(16):                          # connecting at once, as a proxy's pool or a load test does
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(('127.0.0.1', port))
            clients.append(s)
        for s in clients:
            select.select([], [s], [], 30)
            s.setblocking(True)
            s.settimeout(30)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: digit-serve\r\n\r\n")
        assert all(s.recv(4096).startswith(b'HTTP/1.1 200') for s in clients)
        served = owners(sockets_on(port, '01'))                      # the connections held open, by process
        assert len(served) == 2 and sum(served.values()) == 16, served
        for s in clients: s.close()
    finally:
        p.terminate()
        p.wait(30)
