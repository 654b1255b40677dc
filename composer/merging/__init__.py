"""The merge family of build methods: ``merge`` (experts -> one dense model with a merge/
algorithm) and ``moe_merge`` (an MoE -> one with fewer experts).

plan.py and params.py check the spec; execute.py runs the algorithm's executor: dense.py
(streamed training-free merges), calibrated.py (Expert Merging), moe.py (M-SMoE, uniform), with
streaming.py's shared layout and readers and layerwise.py's one-layer-at-a-time model.
"""
