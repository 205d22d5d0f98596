"""Store writes are all-or-nothing and durable (issue 23, items 4 and 5; issue 26's O(1) manifest).

A full disk (or an I/O error) while registering, replacing or unloading is a 507 with the
registry and the manifest exactly as before and no temporary file left behind; an acknowledged
registration survives kill -9 (tests/product/test_store_kill9.py); registering an alias never rewrites the borrowed folder's files.
The ENOSPC tests run twice: on a real, small tmpfs filled to the brim (needs root; skipped with
the reason otherwise) and with ENOSPC injected into every write to the store's files (always)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.store.manifest import COMPACT_AFTER, Manifest
from tests.conftest import ADMIN
from tests.tiny import app_settings

EXAMPLES = ["def add(a, b): return a + b", "for i in range(10): print(i)"]


def _registry(client) -> dict[str, tuple[int, str]]:
    return {a["name"]: (a["version"], a["path"]) for a in client.get("/admin/adapters", headers=ADMIN).json()["adapters"]}


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != ".manifest.lock"}


def _state(client, store: Path) -> tuple:
    """What must not change when a store write fails: the registry, the manifest as a new server
    would read it, and every file in the store (no temp file left, nothing half-replaced)."""
    manifest = Manifest(store)
    return _registry(client), manifest.adapters, manifest.routers, _files(store)


def _refusals(client, store: Path) -> None:
    """Every store-writing admin call on a store that cannot take a byte: a 507, nothing changed."""
    before = _state(client, store)
    calls = [("post", "/admin/adapters", {"name": "gamma", "path": "alpha", "examples": EXAMPLES}),  # new name + centroid
             ("post", "/admin/adapters", {"name": "alpha", "path": "alpha", "examples": EXAMPLES}),  # replace in its own folder
             ("post", "/admin/adapters", {"name": "gamma", "path": "beta"}),  # manifest only
             ("post", "/v1/load_lora_adapter", {"lora_name": "delta", "lora_path": "beta"}),
             ("delete", "/admin/adapters/beta", None),
             ("post", "/v1/unload_lora_adapter", {"lora_name": "alpha"})]
    for method, path, body in calls:
        r = client.request(method, path, json=body, headers=ADMIN)
        assert r.status_code == 507, (path, body, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == "store_write_failed" and "ENOSPC" in err["message"], err
        assert _state(client, store) == before, (path, body)
    ok = client.post("/v1/completions", json={"model": "beta", "prompt": "hi", "max_tokens": 3})
    assert ok.status_code == 200  # still served after its failed unload


@contextlib.contextmanager
def _tmpfs(size: str) -> Iterator[Path]:
    mount = Path(f"/tmp/switchboard-tmpfs-{uuid.uuid4().hex[:8]}")
    mount.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        proc = None
    if proc is None or proc.returncode != 0:
        mount.rmdir()
        reason = proc.stderr.strip() if proc is not None else "no mount command"
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {reason}; "
                    "test_enospc_injected_changes_nothing covers the same paths")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def _fill(folder: Path) -> Path:
    """Take every free byte of the file system `folder` is on."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        for size in (1 << 16, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


def test_full_tmpfs_changes_nothing(store, tiny_model_dir):
    with _tmpfs("16m") as mount:
        root = mount / "adapters"
        shutil.copytree(store, root)
        with TestClient(create_app(app_settings(tiny_model_dir, root))) as client:
            filler = _fill(mount)
            _refusals(client, root)
            filler.unlink()  # space again: the same calls succeed, and the manifest follows
            r = client.post("/admin/adapters", json={"name": "gamma", "path": "alpha", "examples": EXAMPLES}, headers=ADMIN)
            assert r.status_code == 200, r.text
            assert client.delete("/admin/adapters/beta", headers=ADMIN).status_code == 200
            assert set(_registry(client)) == set(Manifest(root).adapters) == {"alpha", "gamma"}


def full_disk_write(store: Path):
    """An `os.write` for which the store's files cannot take a byte (ENOSPC), and every other file
    writes as usual: the paths a full disk takes, without a file system that fills up."""
    real_write, root = os.write, str(store.resolve())

    def write(fd: int, data) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(root):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    return write


def test_enospc_injected_changes_nothing(app_client, store, monkeypatch):
    """ENOSPC from every write into the store's files (temp files, the journal): the paths a full
    disk takes, without a file system that fills up."""
    real_write, write = os.write, full_disk_write(store)
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell the store's files from others")
    # the start-up scan records the folders it found in the background: let it finish first, so
    # the faults below hit the admin calls, not that recording
    deadline = time.monotonic() + 60
    while not {"alpha", "beta"} <= set(Manifest(store).adapters) and time.monotonic() < deadline:
        time.sleep(0.05)
    monkeypatch.setattr(os, "write", write)
    _refusals(app_client, store)
    monkeypatch.setattr(os, "write", real_write)
    r = app_client.post("/admin/adapters", json={"name": "gamma", "path": "beta"}, headers=ADMIN)
    assert r.status_code == 200 and set(Manifest(store).adapters) == {"alpha", "beta", "gamma"}


def test_alias_never_rewrites_the_borrowed_folder(app_client, store):
    """Item 5: a second name on a folder keeps its derived routing data beside its own name; the
    folder's files (and the first adapter's routing) are unchanged, across a restart too."""
    r = app_client.post("/admin/adapters", json={"name": "beta", "path": "beta", "examples": EXAMPLES * 3,
                                                 "centroids": 4}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["adapter"]["centroids"][0] == 4
    folder = dict(_files(store / "beta"))
    mode = (store / "beta" / "centroid.safetensors").stat().st_mode & 0o777
    r = app_client.post("/admin/adapters", json={"name": "alias2", "path": "beta", "examples": ["only one"]}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert _files(store / "beta") == folder
    own = store / "_names" / "alias2" / "centroid.safetensors"
    assert own.is_file() and own.stat().st_mode & 0o777 == mode  # readable as the rest of the store
    adapters = {a["name"]: a for a in app_client.get("/admin/adapters", headers=ADMIN).json()["adapters"]}
    assert adapters["beta"]["centroids"][0] == 4 and adapters["alias2"]["centroids"][0] == 1
    assert Manifest(store).adapters["alias2"]["centroid"] == "_names/alias2/centroid.safetensors"


def test_alias_routing_survives_a_restart(store, tiny_model_dir):
    settings = app_settings(tiny_model_dir, store)
    with TestClient(create_app(settings)) as client:
        assert client.post("/admin/adapters", json={"name": "alias2", "path": "beta", "examples": ["one"]},
                           headers=ADMIN).status_code == 200
    with TestClient(create_app(settings)) as client:
        adapters = {a["name"]: a for a in client.get("/admin/adapters", headers=ADMIN).json()["adapters"]}
        assert adapters["alias2"]["centroids"] == [1, 64] and adapters["beta"]["centroids"] is None


def test_manifest_journal_is_o1_and_compacts(tmp_path):
    """A change appends one record (the snapshot is not rewritten); the journal is folded into the
    snapshot once it holds as many records as the snapshot has names; a torn last line (a crash
    mid-append) is ignored and cut off by the next append; two handles on one store agree."""
    m = Manifest(tmp_path)
    for i in range(COMPACT_AFTER - 1):
        m.set_adapter(f"a{i}", f"a{i}", False)
    assert not m.path.exists() and m.journal.stat().st_size > 0
    other = Manifest(tmp_path)
    assert other.adapters == m.adapters
    m.set_adapter(f"a{COMPACT_AFTER - 1}", "x", True)  # the 64th record: compacted
    assert m.path.exists() and not m.journal.exists()
    assert other.refresh() and other.adapters == m.adapters
    m.drop_adapter("a0")
    with open(m.journal, "ab") as f:
        f.write(b'{"op":"drop_adap')  # a crash mid-append
    assert Manifest(tmp_path).adapters == m.adapters
    m.set_adapter("b", "b", False)
    assert "a0" not in Manifest(tmp_path).adapters and Manifest(tmp_path).adapters == m.adapters
    assert all(line.endswith(b"}") for line in m.journal.read_bytes().splitlines())
