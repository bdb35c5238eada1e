"""Datasets: formats, the manifest, few-shot sampling."""
