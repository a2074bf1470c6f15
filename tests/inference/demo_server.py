"""Starting `megaflamingo-demo` for tests, in its own process.

    python -m tests.inference.demo_server --model DIR [demo options]     # from the checkout's root

As a script: the console script, except that LAION-CLAP's HTSAT (for --rerank-clap with a random
test checkpoint) gets its one torchvision name stubbed where torchvision cannot be imported, and
the hub guard is on (the page and the server must work offline). :func:`serving` runs a command
(this script or the real console script) until the page answers, and stops it afterwards.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(cmd: list, work: Path, timeout_s: float = 300.0, cwd: Path = REPO):
    """Run ``cmd`` (a demo command without ``--port``) in ``cwd`` on a free port; yield its URL once
    the page config is served. Its output goes to ``work/server.log``; it runs in its own session,
    so only what it started is stopped."""
    import pytest

    port = free_port()
    log_path = work / "server.log"
    env = dict(os.environ, GRADIO_TEMP_DIR=str(work / "uploads"), GRADIO_ANALYTICS_ENABLED="False",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd] + ["--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, cwd=cwd)
        try:
            deadline = time.time() + timeout_s
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"demo exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url + "config", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.time() > deadline:
                    pytest.fail(f"demo did not come up in {timeout_s:.0f} s:\n" + log_path.read_text()[-3000:])
                time.sleep(1)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


if __name__ == "__main__":
    from megaflamingo.testing import no_hub
    from megaflamingo.testing.clap import install_torchvision_stub

    no_hub()
    install_torchvision_stub()
    from megaflamingo.cli.demo import main

    sys.exit(main(sys.argv[1:]))
