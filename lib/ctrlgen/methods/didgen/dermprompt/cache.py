"""The per-image DermPrompt cache: one JSON file per image and captioner fingerprint, written atomically."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from ctrlgen.methods.didgen.dermprompt.prompt import Caption
from ctrlgen.paths import make_public


class CaptionCache:
    """One JSON file per image under ``folder/<captioner fingerprint>/<image id>.json``, written atomically."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, fingerprint: str, image_id: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", image_id)
        return self.folder / fingerprint / f"{safe}.json"

    def get(self, fingerprint: str, image_id: str) -> Caption | None:
        """The cached caption of ``image_id`` under ``fingerprint``, or None (absent or damaged)."""
        p = self._path(fingerprint, image_id)
        if not p.is_file():
            return None
        try:
            return Caption.from_json(json.loads(p.read_text(encoding="utf-8")))
        except (ValueError, KeyError):
            return None  # a damaged entry is recomputed

    def put(self, fingerprint: str, image_id: str, caption: Caption) -> Path:
        """Write one caption (temporary file renamed into place: readers never see half a file)."""
        p = self._path(fingerprint, image_id)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(caption.to_json(), fh, indent=1)
            make_public(tmp)  # mkstemp's 0600 would hide the caption from other users of a shared cache
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # no stray temporary file after a failed write
            raise
        return p


__all__ = ["CaptionCache"]
