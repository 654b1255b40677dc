"""`composer sweep SWEEP.yaml`: a base spec and a grid (or list) of overrides, each candidate
built and scored on held-out text, locally or as Ray tasks; see docs/ray.md.

| module | holds |
| --- | --- |
| `spec` | the SWEEP.yaml schema, reading it, expanding candidates, checking field paths |
| `run` | planning every candidate on the driver, the candidate job (build + perplexity) |
| `report` | the results table, results.json, the PNG plot, the best spec |
"""
