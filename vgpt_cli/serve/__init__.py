"""`vgpt serve`: a batched HTTP captioning service and its browser page (needs the `serve` extra)."""
