import hashlib
import io
import json
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from covnet.importers.download import (
    COVID19CTSEG_ZIPS,
    KNOWN_SHA256,
    Checksum,
    download_covid19ctseg,
    download_file,
    file_url,
)
from covnet.runtime.errors import CovnetError


def fake_zip(name: str, size: int = 300_000) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{name}/payload.bin", hashlib.sha256(name.encode()).digest() * (size // 32))
    return buffer.getvalue()


class FakeZenodo(BaseHTTPRequestHandler):
    """Serves ``/files/<name>`` with Range support, and ``/api/record`` with MD5 checksums like Zenodo's API.

    ``server.cut_after[name] = n`` makes the next response for ``name`` stop after ``n`` body bytes (once);
    ``server.honour_range = False`` makes it answer every request with the whole file (status 200).
    """

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path.startswith("/api/record"):
            body = json.dumps({"files": [{"key": name, "checksum": "md5:" + hashlib.md5(data).hexdigest()}
                                         for name, data in (server.record_files or server.files).items()]}).encode()
            return self._send(200, body, {"Content-Type": "application/json"})
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        if name not in server.files:
            return self._send(404, b"not found")
        data = server.files[name]
        start = 0
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if match and server.honour_range:
            start = int(match.group(1))
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
        self._send(206 if start else 200, data[start:], headers, cut=server.cut_after.pop(name, None))

    def _send(self, status, body, headers=None, cut=None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture()
def zenodo():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeZenodo)
    server.files = {name: fake_zip(name) for name in COVID19CTSEG_ZIPS}
    server.cut_after, server.requests, server.honour_range, server.record_files = {}, [], True, None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}/files"
    yield server
    server.shutdown()
    server.server_close()


def sha256_of(data: bytes) -> Checksum:
    return Checksum("sha256", hashlib.sha256(data).hexdigest())


NAME = "Lung_Mask.zip"


def test_full_download_verifies(zenodo, tmp_path):
    path = download_file(file_url(zenodo.base_url, NAME), tmp_path / NAME, sha256_of(zenodo.files[NAME]))
    assert path.read_bytes() == zenodo.files[NAME]
    assert zenodo.requests == [(f"/files/{NAME}?download=1", None)]
    assert not (tmp_path / f"{NAME}.part").exists()


def test_broken_transfer_resumes_with_range(zenodo, tmp_path):
    zenodo.cut_after[NAME] = 100_000
    path = download_file(file_url(zenodo.base_url, NAME), tmp_path / NAME, sha256_of(zenodo.files[NAME]))
    assert path.read_bytes() == zenodo.files[NAME]
    assert [range_header for _, range_header in zenodo.requests] == [None, "bytes=100000-"]


def test_broken_transfer_keeps_part_and_a_rerun_resumes(zenodo, tmp_path):
    zenodo.cut_after[NAME] = 70_000
    url, checksum = file_url(zenodo.base_url, NAME), sha256_of(zenodo.files[NAME])
    with pytest.raises(CovnetError, match="run again to resume"):
        download_file(url, tmp_path / NAME, checksum, attempts=1)
    assert (tmp_path / f"{NAME}.part").stat().st_size == 70_000 and not (tmp_path / NAME).exists()
    download_file(url, tmp_path / NAME, checksum, attempts=1)
    assert (tmp_path / NAME).read_bytes() == zenodo.files[NAME]
    assert zenodo.requests[-1][1] == "bytes=70000-"


def test_server_ignoring_range_restarts_from_zero(zenodo, tmp_path):
    zenodo.cut_after[NAME], zenodo.honour_range = 50_000, False
    download_file(file_url(zenodo.base_url, NAME), tmp_path / NAME, sha256_of(zenodo.files[NAME]))
    assert (tmp_path / NAME).read_bytes() == zenodo.files[NAME]
    assert zenodo.requests[1][1] == "bytes=50000-"  # asked to resume, got the whole file, not a doubled one


def test_checksum_mismatch_deletes_and_raises(zenodo, tmp_path):
    with pytest.raises(CovnetError, match="checksum mismatch") as raised:
        download_file(file_url(zenodo.base_url, NAME), tmp_path / NAME, sha256_of(b"something else"))
    assert raised.value.path == str(tmp_path / NAME)
    assert not (tmp_path / NAME).exists() and not (tmp_path / f"{NAME}.part").exists()


def test_verified_file_is_not_downloaded_again_but_a_corrupt_one_is(zenodo, tmp_path):
    url, checksum = file_url(zenodo.base_url, NAME), sha256_of(zenodo.files[NAME])
    download_file(url, tmp_path / NAME, checksum)
    download_file(url, tmp_path / NAME, checksum)
    assert len(zenodo.requests) == 1
    (tmp_path / NAME).write_bytes(b"truncated")
    download_file(url, tmp_path / NAME, checksum)
    assert len(zenodo.requests) == 2 and (tmp_path / NAME).read_bytes() == zenodo.files[NAME]


def test_release_download_uses_sha256_table_else_zenodo_md5(zenodo, tmp_path, capsys):
    known = {"COVID-19-CT-Seg_20cases.zip": hashlib.sha256(zenodo.files["COVID-19-CT-Seg_20cases.zip"]).hexdigest()}
    paths = download_covid19ctseg(tmp_path, base_url=zenodo.base_url,
                                  record_api_url=zenodo.base_url.replace("/files", "/api/record"), known_sha256=known)
    assert [p.name for p in paths] == list(COVID19CTSEG_ZIPS)
    assert all(p.read_bytes() == zenodo.files[p.name] for p in paths)
    assert sum(path.startswith("/api/record") for path, _ in zenodo.requests) == 1
    printed = capsys.readouterr().err
    assert hashlib.sha256(zenodo.files["Lung_Mask.zip"]).hexdigest() in printed  # the sum to record
    assert hashlib.sha256(zenodo.files["COVID-19-CT-Seg_20cases.zip"]).hexdigest() not in printed


def test_md5_from_record_catches_a_wrong_file(zenodo, tmp_path):
    zenodo.record_files = dict(zenodo.files)  # the record keeps the published MD5s...
    zenodo.files["Lung_Mask.zip"] = fake_zip("other")  # ...but the served bytes differ
    with pytest.raises(CovnetError, match="checksum mismatch: expected md5:"):
        download_covid19ctseg(tmp_path, base_url=zenodo.base_url, names=["Lung_Mask.zip"], known_sha256={},
                              record_api_url=zenodo.base_url.replace("/files", "/api/record"))
    assert not (tmp_path / "Lung_Mask.zip").exists() and not (tmp_path / "Lung_Mask.zip.part").exists()


def test_known_sha256_table_is_well_formed():
    assert set(KNOWN_SHA256) <= set(COVID19CTSEG_ZIPS)
    assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in KNOWN_SHA256.values())
