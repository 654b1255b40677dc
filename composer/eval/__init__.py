"""`composer eval`: held-out perplexity per domain through the served engine, what each expert
contributes (opt-out matrix) and how tokens are routed; see docs/eval.md.

| module | holds |
| --- | --- |
| `data` | `--data NAME=PATH_OR_GLOB` -> files, their hashes, token chunks (composer/text.py) |
| `scoring` | the engine seen as a `Scorer`, perplexity from token logprobs |
| `matrix` | the opt-out matrix (one pass per excluded expert) |
| `routing` | routing fractions, entropy and MaxVio per layer and domain (transformers) |
| `figures` | heatmap PNGs |
| `run` | one evaluation: options, passes, the report |
"""
