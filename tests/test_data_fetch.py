"""`ctrlgen data fetch` end to end against a loopback HTTP server serving archives in the official layout."""
import argparse
import http.server
import io
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from ctrlgen.cli.data import add_data_parser
from ctrlgen.data.fetch import FetchError, fetch_dataset
from ctrlgen.data.readers.common import ReadOptions
from ctrlgen.data.readers.derm import read_isic2018_task1


def _zip(folder: str, files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"{folder}/{name}", data)
    return buffer.getvalue()


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def isic_task1_archives(n: int = 3) -> dict[str, bytes]:
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    images = {f"ISIC_{i:07d}.jpg": _png(np.full((16, 16, 3), 100 + i)) for i in range(n)}
    images["LICENSE.txt"] = b"CC BY-NC 4.0"
    masks = {f"ISIC_{i:07d}_segmentation.png": _png(mask) for i in range(n)}
    return {"ISIC2018_Task1-2_Training_Input.zip": _zip("ISIC2018_Task1-2_Training_Input", images),
            "ISIC2018_Task1_Training_GroundTruth.zip": _zip("ISIC2018_Task1_Training_GroundTruth", masks)}


class Server:
    """Serves ``files``; honours Range; the first request for a name in ``cut_once`` is cut half-way."""

    def __init__(self, files, cut_once=()):
        self.files, self.cut_once, self.requests = dict(files), set(cut_once), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                outer.requests.append((name, self.headers.get("Range")))
                if name not in outer.files:
                    self.send_error(404)
                    return
                data, start = outer.files[name], 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if name in outer.cut_once:
                    outer.cut_once.discard(name)
                    body = body[: len(body) // 2]
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(files, cut_once=()):
        servers.append(Server(files, cut_once))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_fetch_resumes_and_installs_official_layout(tmp_path, server_factory):
    archives = isic_task1_archives()
    big = "ISIC2018_Task1-2_Training_Input.zip"
    server = server_factory(archives, cut_once={big})
    installed = fetch_dataset("isic2018_task1", tmp_path, mirror=server.url, progress=False, retries=2)
    ranges = [r for n, r in server.requests if n == big]
    assert ranges[0] is None and ranges[1] == f"bytes={len(archives[big]) // 2}-"  # resumed where it was cut
    assert {p.name for p in installed} == {"ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"}
    ds = read_isic2018_task1(tmp_path / "isic2018", ReadOptions())
    assert len(ds) == 3 and not ds.issues
    assert (tmp_path / ".ctrlgen-fetch" / "checksums.json").is_file()
    # a second fetch skips what is installed (and asks again only for the optional files it lacked)
    before = len(server.requests)
    fetch_dataset("isic2018_task1", tmp_path, mirror=server.url, progress=False)
    assert not {n for n, _ in server.requests[before:]} & set(archives)


def test_corrupt_archive_rejected_nothing_half_written(tmp_path, server_factory):
    archives = isic_task1_archives()
    bad = "ISIC2018_Task1_Training_GroundTruth.zip"
    archives[bad] = archives[bad][:-40] + b"\0" * 40  # damaged central directory
    server = server_factory(archives)
    with pytest.raises(FetchError, match="not a valid zip archive|corrupt member"):
        fetch_dataset("isic2018_task1", tmp_path, mirror=server.url, progress=False)
    assert not (tmp_path / "isic2018" / "ISIC2018_Task1_Training_GroundTruth").exists()
    work = tmp_path / ".ctrlgen-fetch"
    assert not list(work.glob("unpack-*")) and not (work / f"{bad}.part").exists()


def test_checksum_mismatch_against_recorded_value(tmp_path, server_factory):
    archives = isic_task1_archives()
    server = server_factory(archives)
    fetch_dataset("isic2018_task1", tmp_path, mirror=server.url, progress=False)
    other = tmp_path / "second"
    other.mkdir()
    (other / ".ctrlgen-fetch").mkdir()
    (other / ".ctrlgen-fetch" / "checksums.json").write_bytes((tmp_path / ".ctrlgen-fetch" / "checksums.json").read_bytes())
    server.files["ISIC2018_Task1-2_Training_Input.zip"] = isic_task1_archives(4)["ISIC2018_Task1-2_Training_Input.zip"]
    with pytest.raises(FetchError, match="does not match"):
        fetch_dataset("isic2018_task1", other, mirror=server.url, progress=False)
    assert not (other / "isic2018").exists()


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_refusals_and_check(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CTRLGEN_DATA_ROOT", str(tmp_path / "absent"))
    monkeypatch.setenv("CTRLGEN_CACHE_ROOT", str(tmp_path / "cache"))
    assert _cli(["data", "fetch", "no_such_dataset"]) == 2
    assert "unknown dataset 'no_such_dataset'" in capsys.readouterr().err
    assert _cli(["data", "fetch", "mimic_cxr"]) == 2
    out = capsys.readouterr().err
    assert "credentialed" in out and "physionet.org" in out
    assert _cli(["data", "check", "--profile", "smoke"]) == 1  # a data root that does not exist is an error
    assert f"the data root {tmp_path / 'absent'} does not exist" in capsys.readouterr().err
    (tmp_path / "absent").mkdir()
    assert _cli(["data", "check", "--profile", "smoke"]) == 0
    out = capsys.readouterr().out
    assert out.count(" missing ") >= 12 and "put it at:" in out
