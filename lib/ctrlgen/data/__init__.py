"""The data layer (DESIGN §3, layer 2): readers for every dataset of the thesis in its official layout,
procedural worlds that write the same layouts, lesion attributes (§5.3.2), check and fetch.

Chapters call :func:`load_dataset`; the returned :class:`Dataset` says whether it is real or procedural.
"""
from ctrlgen.data.datasets import (
    chexpert_label_table, dataset_folder, load_dataset, load_multiconcept, read_options, resize_dataset, world_root,
)
from ctrlgen.data.records import DataError, Dataset, ReadIssue, Record
from ctrlgen.data.registry import SPECS

__all__ = ["load_dataset", "load_multiconcept", "resize_dataset", "world_root", "dataset_folder", "read_options",
           "chexpert_label_table", "Dataset", "Record", "ReadIssue", "DataError", "SPECS"]
