"""Captions as labels: a domain's data with every caption naming every attribute of its image.

A base model trains on its domain's captions as written. The scenes world writes some objects of a
pretraining caption by their shape alone (``data.worlds.multiconcept``: web captions omit attributes too),
so those captions are not complete labels. Whatever reads a caption as the truth about its image — chapter
2's attribute classifier, the prompts whose fidelity the bar scores, the word-localization rows — reads
``with_complete_captions(cfg, data)`` instead: the same images with the world's ``full_caption``. Derm and
CXR captions already name everything they label and come back unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ctrlgen.data.datasets import multiconcept_full_captions
from ctrlgen.data.domains import DomainData
from ctrlgen.data.records import DataError


def with_complete_captions(cfg: Mapping[str, Any], data: DomainData) -> DomainData:
    """``data`` with its training and held-out captions replaced by complete ones (module doc)."""
    if data.domain != "scenes" or data.dataset != "multiconcept":
        return data
    full = multiconcept_full_captions(cfg)   # the caption file only: cheap enough to call per measurement
    missing = [i for i in (*data.ids, *data.heldout_ids) if i not in full]
    if missing:
        raise DataError(f"scenes records {missing[:3]} are not among the multiconcept world's pretraining scenes; "
                        f"expected the world these data were loaded from")
    return replace(data, captions=[full[i] for i in data.ids], heldout_captions=[full[i] for i in data.heldout_ids])


__all__ = ["with_complete_captions"]
