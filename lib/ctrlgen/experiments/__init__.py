"""Experiments (DESIGN.md §3 layer 8): what only one chapter does, one module per chapter.

* ``base_models`` — the base models every chapter starts from (chapter 2's pretraining of the mini
  models: cache keys, training, what is measured and stored with them). Shared by every chapter.
* ``ch02_background`` — chapter 2's toy DDPM on 2-D distributions.
* ``ch04_didgen`` — chapter 4's sample and pair sets, segmenter, tables and figures; its ``models`` module holds
  the four finetuned models and their cache (a module of its own so that evaluation edits never retrain them).

Chapters import these; ``methods`` and everything below never do. A chapter's module imports
``base_models`` and the layers above, never another chapter's module (tests/test_layering.py).
"""
