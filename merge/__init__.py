"""Merge algorithms: pure tensor functions (torch, scipy) and calibration-driven merges.

No dependency on the CLI, the spec layer or the registry database. merge.methods.METHODS is
the one table of methods (name -> kind, pydantic parameter model, function). Dense merges work
one tensor at a time (stream a checkpoint with merge.state_dict.merge_tensor) or over whole
state dicts (merge.state_dict.merge_state_dicts). M-SMoE needs routing statistics from
merge.routing_stats.collect_routing_stats. Every bad input raises merge.MergeError.
"""

from merge.errors import MergeError

__all__ = ["MergeError"]
