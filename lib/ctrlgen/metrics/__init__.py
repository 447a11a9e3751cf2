"""Metrics (DESIGN.md §3 layer 7): distribution distances, image metrics, segmentation and report metrics."""
