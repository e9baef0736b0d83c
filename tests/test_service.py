"""The REST service, live: uvicorn in a subprocess, httpx as the client, one server for the module.

The server answers with a scripted policy (``--policy test_service:scripted_policy``: the
programs below, with ``segment`` returning the uploaded image thresholded at 0.5), so every
request goes through the real service, store, agent loop and sandbox.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

import voxel_lib as vl
from voxel_lib import shapes
from voxelprompt.policy import ScriptedPolicy, Step
from voxelprompt.transcript import validate

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-token-" + "x" * 20
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VOLUME = "what is the volume of the lesion?"
WIDTH = "and how wide is it?"


def scripted_policy(inputs):
    """The server's policy factory: volume and width programs; segment() = the image above 0.5."""
    t1 = inputs[0].volume
    mask = t1.new((t1.tensor > 0.5).to(torch.uint8), kind="label")
    programs = {
        VOLUME: [Step('lesion = segment(t1<MOD>)\nvolume = vl.volume(lesion, "mL")\nprint(volume)', masks=[[mask]]),
                 Step('report(measurements={"volume": volume}, volumes={"lesion": lesion})')],
        WIDTH: [Step('width = vl.extent(lesion, "lr")\nprint(width)\nreport(measurements={"width": width})')],
    }

    def script(state):
        if state.prompt.startswith("read "):     # generated code trying to read another session's file
            return [Step(f"print(open({state.prompt[5:]!r}, 'rb').read(4))")]
        return programs[state.prompt]
    return ScriptedPolicy(script, source="threshold")


def _image(radius=9.0):
    shape, aff = (20, 22, 18), vl.ras_grid((20, 22, 18), 3.0)
    ball = shapes.sphere(shape, aff, (4.0, 0.0, 0.0), radius)
    g = torch.Generator().manual_seed(0)
    return vl.Volume(0.3 * torch.rand(shape, generator=g) + 0.6 * ball.tensor[0].float(), aff), ball


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, state: Path, data_root: Path):
        self.state, self.data_root, self.port = state, data_root, _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log, self.log_path = None, state.parent / "server.log"

    def start(self) -> float:
        env = dict(os.environ, VOXELPROMPT_TOKEN=TOKEN,
                   PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
        t = time.perf_counter()
        if self.log is not None:
            self.log.close()
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "voxelprompt.cli", "serve", "--port", str(self.port), "--state-dir", str(self.state),
             "--data-root", str(self.data_root), "--policy", "test_service:scripted_policy", "--max-upload-mb", "1",
             "--max-kernels", "2", "--pool-size", "0", "--log-level", "warning"],
            env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        while time.perf_counter() - t < 90:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited: " + self.log_path.read_text())
            try:
                if httpx.get(self.url + "/v1/health", timeout=1).status_code == 200:
                    return time.perf_counter() - t
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def kill(self) -> None:     # a crash, not a graceful stop: what was acknowledged must survive
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self.log is not None:
            self.log.close()
            self.log = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    (root / "data" / "sub-01").mkdir(parents=True)
    img, _ = _image()
    vl.save(img, root / "data" / "sub-01" / "t1.nii.gz")
    (root / "secret.nii.gz").write_bytes(b"outside the data root")
    srv = Server(root / "state", root / "data")
    srv.start_s = srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _upload(client, tmp_path, name="t1", radius=9.0, headers=AUTH):
    img, ball = _image(radius)
    p = vl.save(img, tmp_path / f"{name}.nii.gz")
    with open(p, "rb") as f:
        r = client.post("/v1/sessions", files={name: (p.name, f, "application/gzip")}, headers=headers)
    return r, img, ball


def test_auth_health_and_docs(client, server):
    assert client.get("/v1/health").json()["status"] == "ok"           # liveness needs no token
    r = client.post("/v1/sessions", files={"t1": ("t1.nii.gz", b"x")})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = client.post("/v1/sessions", files={"t1": ("t1.nii.gz", b"x")}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert client.get("/v1/sessions/" + "0" * 32).status_code == 401
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/sessions", "/v1/sessions/{sid}/messages", "/v1/sessions/{sid}/transcript"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/sessions"]["post"]["requestBody"]["content"]


def test_upload_limits_and_validation(client, tmp_path, server):
    big = os.urandom(int(1.5 * (1 << 20)))
    r = client.post("/v1/sessions", files={"t1": ("t1.nii.gz", big)}, headers=AUTH)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    def chunked():          # no Content-Length: the limit is enforced while the body streams in
        yield b'--B\r\nContent-Disposition: form-data; name="t1"; filename="t1.nii.gz"\r\n\r\n'
        for _ in range(24):
            yield b"\0" * 65536
        yield b"\r\n--B--\r\n"
    r = client.post("/v1/sessions", content=chunked(), headers=AUTH | {"Content-Type": "multipart/form-data; boundary=B"})
    assert r.status_code == 413
    r = client.post("/v1/sessions", files={"t1": ("t1.nii.gz", b"this is not a NIfTI file" * 20)}, headers=AUTH)
    assert r.status_code == 422 and "t1" in r.json()["detail"]
    img, _ = _image()
    p = vl.save(img, tmp_path / "x.nii.gz")
    r = client.post("/v1/sessions", files={"brain": ("x.nii.gz", p.read_bytes())}, headers=AUTH)
    assert r.status_code == 422 and "unknown volume name" in r.json()["detail"]
    r = client.post("/v1/sessions", data={"flair": "a path"}, files={"t1": ("x.nii.gz", p.read_bytes())},
                    headers=AUTH)
    assert r.status_code == 422 and "not a file" in r.json()["detail"]
    assert client.post("/v1/sessions", data={"t1": "a path"}, headers=AUTH).status_code == 415
    # server-side paths: only under the data root
    r = client.post("/v1/sessions", json={"volumes": {"t1": "sub-01/t1.nii.gz"}}, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["inputs"][0]["uploaded"] is False
    r = client.post("/v1/sessions", json={"volumes": {"t1": "../secret.nii.gz"}}, headers=AUTH)
    assert r.status_code == 403
    r = client.post("/v1/sessions", json={"volumes": {"t1": "sub-01/none.nii.gz"}}, headers=AUTH)
    assert r.status_code == 404
    # nothing of the refused uploads is left behind
    sessions = [p for p in (server.state / "sessions").iterdir()]
    assert len(sessions) == 1


def _sse(client, sid, prompt):
    events = []
    with client.stream("POST", f"/v1/sessions/{sid}/messages", json={"prompt": prompt, "stream": True},
                       headers=AUTH) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_session_lifecycle_survives_a_restart(client, server, tmp_path):
    t = time.perf_counter()
    r, img, ball = _upload(client, tmp_path)
    upload_s = time.perf_counter() - t
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert r.json()["inputs"] == [{"key": "t1", "name": "t1", "sha256": r.json()["inputs"][0]["sha256"],
                                   "uploaded": True}]
    # ask: answer, measurements, outputs and steps in one response
    t = time.perf_counter()
    r = client.post(f"/v1/sessions/{sid}/messages", json={"prompt": VOLUME}, headers=AUTH)
    ask_s = time.perf_counter() - t
    assert r.status_code == 200, r.text
    body = r.json()
    want = float(vl.volume(img.new((img.tensor > 0.5).to(torch.uint8), kind="label"), "mL"))
    assert body["status"] == "done" and body["measurements"] == [{"name": "volume", "value": pytest.approx(want),
                                                                  "unit": "mL"}]
    assert [s["code"].splitlines()[0] for s in body["steps"]] == ["lesion = segment(t1<MOD>)",
                                                                   'report(measurements={"volume": volume}, '
                                                                   'volumes={"lesion": lesion})']
    out = body["outputs"][0]
    assert out["name"] == "lesion" and out["kind"] == "label"
    # outputs: the NIfTI in the input's geometry and its PNG preview
    nii = client.get(out["nifti_url"], headers=AUTH)
    assert nii.status_code == 200
    mask = vl.load(_write(tmp_path / "lesion.nii.gz", nii.content))
    assert mask.same_grid(img) and int(mask.tensor.sum()) == int((img.tensor > 0.5).sum())
    png = client.get(out["png_url"], headers=AUTH)
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert client.get(out["png_url"]).status_code == 401
    # transcript as JSON (schema-valid) and HTML (images inline)
    tr = client.get(f"/v1/sessions/{sid}/transcript", headers=AUTH).json()
    assert validate(tr) == [] and tr["turns"][0]["answer"]["measurements"][0]["name"] == "volume"
    html = client.get(f"/v1/sessions/{sid}/transcript?format=html", headers=AUTH)
    assert html.status_code == 200 and "data:image/png;base64," in html.text and "segment(t1&lt;MOD&gt;)" in html.text
    # a follow-up, streamed step by step; the kernel still holds `lesion`
    t = time.perf_counter()
    events = _sse(client, sid, WIDTH)
    stream_s = time.perf_counter() - t
    assert [e for e, _ in events] == ["turn", "step", "answer"]
    assert events[1][1]["code"].startswith("width = vl.extent(lesion")
    assert events[2][1]["status"] == "done" and events[2][1]["measurements"][0]["name"] == "width"
    # another session cannot reach this one's files (neither over HTTP nor from its kernel)
    r2, _, _ = _upload(client, tmp_path, radius=6.0)
    sid2 = r2.json()["id"]
    assert client.get(f"/v1/sessions/{sid2}/turn-1/outputs/lesion.nii.gz", headers=AUTH).status_code == 404
    upload_path = next((server.state / "sessions" / sid / "uploads").iterdir())
    r = client.post(f"/v1/sessions/{sid2}/messages", json={"prompt": f"read {upload_path}"}, headers=AUTH)
    assert r.json()["steps"][0]["error"]["name"] in ("FileNotFoundError", "PermissionError")
    assert client.get(f"/v1/sessions/{sid}/turn-1/outputs/..%2F..%2Fstate.sqlite3", headers=AUTH).status_code == 404
    # a crash and a restart: the session, its messages, transcript and outputs are still there
    server.kill()
    restart_s = server.start()
    info = client.get(f"/v1/sessions/{sid}", headers=AUTH).json()
    assert [(m["index"], m["prompt"], m["status"]) for m in info["messages"]] == [(0, VOLUME, "done"), (1, WIDTH, "done")]
    assert client.get(out["nifti_url"], headers=AUTH).content == nii.content
    # ... and its kernel state is rebuilt from the transcript at the next question
    t = time.perf_counter()
    r = client.post(f"/v1/sessions/{sid}/messages", json={"prompt": WIDTH}, headers=AUTH)
    restore_s = time.perf_counter() - t
    assert r.status_code == 200 and r.json()["status"] == "done", r.text
    assert r.json()["measurements"] == events[2][1]["measurements"]
    assert "restore_s" in r.json()["timing"]
    import sqlite3
    with sqlite3.connect(server.state / "state.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # delete: gone from the API and the disk
    assert client.delete(f"/v1/sessions/{sid}", headers=AUTH).status_code == 204
    assert client.get(f"/v1/sessions/{sid}", headers=AUTH).status_code == 404
    assert not (server.state / "sessions" / sid).exists()
    print(f"\nREST timings: server start {server.start_s:.2f} s, upload {upload_s:.3f} s, first ask (kernel start) "
          f"{ask_s:.2f} s, streamed follow-up {stream_s:.3f} s, restart {restart_s:.2f} s, ask after restart "
          f"(kernel start + restore) {restore_s:.2f} s")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_kernel_slots_evict_the_least_recently_used_idle_session_and_queue():
    import threading

    from voxelprompt.service import KernelsBusy, KernelSlots

    class Conv:
        suspended = 0

        def suspend(self):
            self.suspended += 1

    class RT:
        def __init__(self, sid):
            self.sid, self.busy, self.conv = sid, False, Conv()

    slots = KernelSlots(2)
    a, b, c = RT("a"), RT("b"), RT("c")
    slots.acquire(a, 1)
    slots.acquire(b, 1)
    with pytest.raises(KernelsBusy):            # both running: c waits, then gives up
        slots.acquire(c, 0.2)
    slots.done(a)
    slots.done(b)
    slots.acquire(b, 1)                          # b is used again: a is now the least recent
    slots.done(b)
    slots.acquire(c, 1)                          # evicts a (idle, least recently used)
    assert a.conv.suspended == 1 and b.conv.suspended == 0 and list(slots.live) == ["b", "c"]
    slots.acquire(b, 1)                          # b and c running; a queues until one is done
    got = threading.Event()
    t = threading.Thread(target=lambda: (slots.acquire(a, 10), got.set()))
    t.start()
    assert not got.wait(0.3) and slots.waiting == 1
    slots.done(c)
    assert got.wait(5) and c.conv.suspended == 1 and set(slots.live) == {"a", "b"}
    t.join()


def test_serve_requires_a_token(monkeypatch, capsys):
    from voxelprompt.cli import main
    monkeypatch.delenv("VOXELPROMPT_TOKEN", raising=False)
    assert main(["serve", "--port", "1"]) == 2
    assert "VOXELPROMPT_TOKEN" in capsys.readouterr().err
