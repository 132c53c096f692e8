"""Process and socket helpers shared by the benchmark scripts (bench.py, bench_http.py, bench_bpf.py)."""
import signal
import socket
import subprocess
import time

# Every process a benchmark starts, stopped in reverse order by stop_all().
procs = []


def start(cmd, **kw):
    """Starts `cmd` (output discarded unless given) and remembers it for stop_all()."""
    p = subprocess.Popen(cmd, stdout=kw.pop("stdout", subprocess.DEVNULL), stderr=kw.pop("stderr", subprocess.DEVNULL),
                         **kw)
    procs.append(p)
    return p


def wait_port(port, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def stop_all():
    """SIGTERM to every started process, newest first; SIGKILL to one that does not exit within 10 s."""
    for p in reversed(procs):
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=10)
        except Exception:
            p.kill()
