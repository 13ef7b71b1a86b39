"""Shared by the router's tests and bench/router.py: a TCP proxy that can cut its connections
(a real network fault between the router and a region, at a chosen event of a stream), the
router app on a uvicorn thread, and starting / killing `jobs/serve.py` regions."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import httpx

ROOT = Path(__file__).resolve().parent.parent


class CuttingProxy:
    """127.0.0.1:port -> 127.0.0.1:target, byte for byte, on its own thread and event loop.

    cut_after(n): the next response that carries server-sent events is cut (both sockets
    closed) after its n-th event (0: right after its headers), plus `extra` bytes of the
    next one (a cut mid-event).
    down(): stop listening (connections are refused) and reset the open ones: a region gone.
    up(): listen on the same port again.
    delay_s: hold each response this long before its first byte (a slow region).
    tail_delay_s: hold a chunked body's last chunk ("0\r\n\r\n") this long after the rest, as a
    wide-area network may deliver it a little later than the data before it.
    """

    def __init__(self, target_port: int):
        self.target = target_port
        self.port = 0
        self.delay_s = 0.0
        self.tail_delay_s = 0.0
        self.accepted = 0  # connections taken (a client that pools them keeps this low)
        self._cut: Optional[tuple] = None
        self._writers: List[asyncio.StreamWriter] = []
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="cutting-proxy")

    def __enter__(self) -> "CuttingProxy":
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut_after(self, events: int, extra: int = 0) -> None:
        self._cut = (events, extra)

    def down(self) -> None:
        self._call(self._down)

    def up(self) -> None:
        self._call(self._listen)

    def _call(self, fn) -> None:
        """Run fn on the proxy's loop and wait for it (the change holds when this returns)."""
        asyncio.run_coroutine_threadsafe(fn(), self.loop).result(10)

    # ---------------------------------------------------------------- the loop

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = None
        self.loop.run_until_complete(self._listen())
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._down())
        tasks = asyncio.all_tasks(self.loop)
        for t in tasks:
            t.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]

    async def _down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in self._writers:
            w.transport.abort()  # RST: as abrupt as a lost machine
        self._writers.clear()

    async def _serve(self, reader, writer) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers += [writer, up_writer]
        try:
            await asyncio.gather(self._pipe(reader, up_writer, None),
                                 self._pipe(up_reader, writer, (writer, up_writer)), return_exceptions=True)
        except asyncio.CancelledError:  # the proxy is closing: end quietly (asyncio logs a cancelled callback)
            pass

    async def _pipe(self, reader, writer, cuttable) -> None:
        events, armed = 0, None
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if cuttable is not None and data.startswith(b"HTTP/"):  # a response begins (keep-alive: not the first)
                    events, armed = 0, None  # a cut armed for a shorter response is not carried over
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                if cuttable is not None and armed is None and self._cut is not None and b"text/event-stream" in data:
                    armed, self._cut = self._cut, None  # this response is the one to cut
                if armed is not None:
                    n, extra = armed
                    at, pos = (data.find(b"\r\n\r\n") + 4 if n == 0 else None), 0
                    while events < n:
                        i = data.find(b"\n\n", pos)
                        if i < 0:
                            break
                        events, pos = events + 1, i + 2
                        if events == n:
                            at = pos
                    if at is not None:
                        writer.write(data[:at + extra])
                        await writer.drain()
                        for w in cuttable:
                            w.transport.abort()
                        return
                if cuttable is not None and self.tail_delay_s and len(data) > 5 and data.endswith(b"0\r\n\r\n"):
                    writer.write(data[:-5])
                    await writer.drain()
                    await asyncio.sleep(self.tail_delay_s)
                    data = data[-5:]
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort() if writer.transport.is_closing() else writer.close()


class RouterThread:
    """The router app on uvicorn (lifespan on: the probes and the HTTP client) on a daemon thread."""

    def __init__(self, app, port: int = 0):
        import uvicorn
        from serve_helpers import free_port

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name=f"router-{self.port}", daemon=True)

    def __enter__(self) -> "RouterThread":
        self.thread.start()
        for _ in range(1000):
            if self.server.started:
                return self
            if not self.thread.is_alive():
                break
            time.sleep(0.01)
        raise RuntimeError(f"the router did not start on {self.url}")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def router(self):
        return self.app.state.router


# ---------------------------------------------------------------- regions as processes


def start_region(checkpoint: Path, port: int, log: Path, overrides=(), env=None, args=()) -> subprocess.Popen:
    """`python jobs/serve.py` on 127.0.0.1:port: its own local Ray cluster (RAY_ADDRESS unset);
    `args`: more of its flags (e.g. --ingress)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MORAY_API_KEYS")}
    environ.update(env or {})
    cmd = [sys.executable, str(ROOT / "jobs" / "serve.py"), "--checkpoint", str(checkpoint), "--port", str(port)]
    for o in overrides:
        cmd += ["--set", o]
    cmd += list(args)
    return subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 600) -> None:
    """Until url/health answers 200 (bounded); the log's tail if the process died first."""
    pause = threading.Event()
    for _ in range(int(timeout_s / 0.5)):
        if proc.poll() is not None:
            raise RuntimeError(f"the region on {url} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        pause.wait(0.5)
    raise RuntimeError(f"the region on {url} was not healthy within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def _descendants(pid: int) -> List[int]:
    """pid and every process below it (Ray's raylet, GCS, workers), from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_region(proc: subprocess.Popen) -> None:
    """SIGKILL to the serving process and everything it started: the region is gone at once,
    as a lost datacenter would be (no draining, connections reset)."""
    for pid in _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)


def stop_region(proc: subprocess.Popen) -> None:
    """SIGTERM (Ray shuts its cluster down), then SIGKILL whatever is left."""
    if proc.poll() is None:
        pids = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
