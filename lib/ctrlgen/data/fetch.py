"""``ctrlgen data fetch NAME``: download openly available datasets into their official layout.

Each file is downloaded to ``<data root>/.ctrlgen-fetch/<file>.part`` and resumed with an HTTP
``Range`` request after an interruption; its SHA-256 is checked against the published value or, when
the source publishes none, against the value recorded on the first complete download
(``checksums.json``). Archives are tested and unpacked into a temporary folder and moved into place
only when complete; a corrupt archive is rejected and leaves nothing half-written. Credentialed
datasets (MIMIC-CXR, CheXpert, DDI) are refused with instructions.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ctrlgen.progress import tqdm

from ctrlgen.data.registry import SPECS

ISIC_2018 = "https://isic-challenge-data.s3.amazonaws.com/2018/"
WORK = ".ctrlgen-fetch"


class FetchError(RuntimeError):
    """A download or unpack that failed; nothing was moved into the dataset folders."""


@dataclass(frozen=True)
class RemoteFile:
    url: str
    dest: str                 # folder relative to the data root
    sha256: str = ""          # published checksum ("" = record on first download)
    unpack: bool = True       # zip archive to unpack into dest
    optional: bool = False    # a 404 skips it (e.g. test ground truth not yet released on a mirror)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _isic(names: list[str], dest: str = "isic2018", optional: tuple[str, ...] = ()) -> list[RemoteFile]:
    return [RemoteFile(ISIC_2018 + n, dest, unpack=n.endswith(".zip"), optional=n in optional) for n in names]


SOURCES: dict[str, list[RemoteFile]] = {
    "isic2018_task1": _isic(
        ["ISIC2018_Task1-2_Training_Input.zip", "ISIC2018_Task1_Training_GroundTruth.zip",
         "ISIC2018_Task1-2_Validation_Input.zip", "ISIC2018_Task1_Validation_GroundTruth.zip",
         "ISIC2018_Task1-2_Test_Input.zip", "ISIC2018_Task1_Test_GroundTruth.zip"],
        optional=("ISIC2018_Task1-2_Validation_Input.zip", "ISIC2018_Task1_Validation_GroundTruth.zip",
                  "ISIC2018_Task1-2_Test_Input.zip", "ISIC2018_Task1_Test_GroundTruth.zip")),
    "isic2018_task3": _isic(
        [f"ISIC2018_Task3_{s}_{k}.zip" for s in ("Training", "Validation", "Test") for k in ("Input", "GroundTruth")]
        + ["ISIC2018_Task3_Training_LesionGroupings.csv"],
        optional=tuple(f"ISIC2018_Task3_{s}_{k}.zip" for s in ("Validation", "Test") for k in ("Input", "GroundTruth"))),
    # HAM10000 images and labels are ISIC 2018 Task 3's training set; its metadata CSV and the expert
    # segmentations are on Harvard Dataverse (no stable per-file URL): see data/README.md.
    "ham10000": _isic(["ISIC2018_Task3_Training_Input.zip", "ISIC2018_Task3_Training_GroundTruth.zip",
                       "ISIC2018_Task3_Training_LesionGroupings.csv"]),
    "fitzpatrick17k": [RemoteFile("https://raw.githubusercontent.com/mattgroh/fitzpatrick17k/main/fitzpatrick17k.csv",
                                  "fitzpatrick17k", unpack=False)],
}
MANUAL_NOTE = {
    "ham10000": "HAM10000_metadata.csv and HAM10000_segmentations_lesion_tschandl.zip: download from "
                "https://doi.org/10.7910/DVN/DBW86T and unpack into <data root>/ham10000/.",
}


def refusal(name: str) -> str:
    """Why ``name`` cannot be fetched, and what to do instead ("" if it can be)."""
    if name in SOURCES:
        return ""
    if name not in SPECS:
        return f"unknown dataset {name!r}; fetchable: {', '.join(SOURCES)}; all datasets: {', '.join(SPECS)}"
    s = SPECS[name]
    kind = "is credentialed" if s.credentialed else "has no stable open download URL"
    return (f"{name} ({s.title}) {kind}; ctrlgen will not download it. Obtain it from {s.obtain} "
            f"(licence: {s.licence}) and place it at <data root>/{s.folder} ({s.expect}); "
            "then `ctrlgen data check` shows it as found.")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, part: Path, retries: int, timeout: float, progress: bool) -> None:
    """Download ``url`` to ``part``, resuming from its current size; retries on broken transfers."""
    for attempt in range(retries + 1):
        offset = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if offset and response.status != 206:  # server ignored the range: start over
                    offset = 0
                total = response.headers.get("Content-Length")
                total = int(total) + offset if total is not None else None
                if response.status == 206:
                    content_range = response.headers.get("Content-Range", "")
                    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
                        total = int(content_range.rsplit("/", 1)[1])
                with open(part, "ab" if offset else "wb") as out, tqdm(
                        total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[:-5],
                        disable=not progress, leave=False) as bar:
                    for block in iter(lambda: response.read(1 << 16), b""):
                        out.write(block)
                        bar.update(len(block))
            size = part.stat().st_size
            if total is None or size == total:
                return
            error: Exception = FetchError(f"{url}: got {size} of {total} bytes")
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:  # already complete
                return
            raise
        except (urllib.error.URLError, OSError, ConnectionError) as err:
            error = err
        if attempt == retries:
            raise FetchError(f"{url}: transfer failed after {retries + 1} attempts ({error}); "
                             f"run the same command again to resume from {part.stat().st_size if part.exists() else 0} bytes")


def _check_sum(remote: RemoteFile, file: Path, record: Path) -> None:
    actual = sha256_of(file)
    recorded = json.loads(record.read_text()) if record.is_file() else {}
    expected = remote.sha256 or recorded.get(remote.filename, "")
    if expected and actual != expected:
        file.unlink()
        raise FetchError(f"{remote.filename}: SHA-256 {actual} does not match the expected {expected}; "
                         "the download was deleted")
    if not expected:
        recorded[remote.filename] = actual
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(recorded, indent=1, sort_keys=True))
        os.replace(tmp, record)


def _install(remote: RemoteFile, file: Path, root: Path, work: Path) -> list[Path]:
    """Unpack (or move) a verified download into ``root/dest``; all-or-nothing."""
    dest = root / remote.dest
    dest.mkdir(parents=True, exist_ok=True)
    if not remote.unpack:
        target = dest / remote.filename
        os.replace(file, target)
        return [target]
    tmp = Path(tempfile.mkdtemp(prefix=f"unpack-{remote.filename}.", dir=work))
    try:
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
                if bad is not None:
                    raise FetchError(f"{remote.filename}: corrupt member {bad}")
                for member in archive.namelist():
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise FetchError(f"{remote.filename}: unsafe path {member!r} in archive")
                archive.extractall(tmp)
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise FetchError(f"{remote.filename}: not a valid zip archive ({err}); it was deleted") from None
        entries = [p for p in tmp.iterdir() if p.name != "__MACOSX"]
        clashes = [dest / p.name for p in entries if (dest / p.name).exists()]
        if clashes:
            raise FetchError(f"{remote.filename}: {', '.join(map(str, clashes))} already exist(s); "
                             "move them away to fetch again")
        for entry in entries:
            os.replace(entry, dest / entry.name)
        file.unlink()
        return [dest / p.name for p in entries]
    except FetchError:
        file.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_dataset(name: str, root: Path, mirror: str = "", retries: int = 3, timeout: float = 60.0,
                  progress: bool = True) -> list[Path]:
    """Download dataset ``name`` into ``root`` (the data root); returns what was installed.

    ``mirror`` replaces each URL's folder (``https://host/path/``) with another base URL, e.g. an
    institutional copy. Files already installed by an earlier fetch are skipped.
    """
    reason = refusal(name)
    if reason:
        raise FetchError(reason)
    work = root / WORK
    work.mkdir(parents=True, exist_ok=True)
    installed: list[Path] = []
    for remote in SOURCES[name]:
        done = work / f"{remote.filename}.done"
        if done.is_file():
            continue
        url = mirror.rstrip("/") + "/" + remote.filename if mirror else remote.url
        part = work / f"{remote.filename}.part"
        try:
            _download(url, part, retries, timeout, progress)
        except urllib.error.HTTPError as err:
            if err.code == 404 and remote.optional:
                print(f"skipped optional {remote.filename}: not found at {url}")
                continue
            raise FetchError(f"{url}: HTTP {err.code} {err.reason}") from None
        _check_sum(remote, part, work / "checksums.json")
        installed += _install(remote, part, root, work)
        done.write_text(url + "\n")
    if name in MANUAL_NOTE:
        print(MANUAL_NOTE[name])
    return installed
