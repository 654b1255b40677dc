"""Merge algorithms: pure tensor functions (torch, scipy) and calibration-driven merges.

No dependency on the CLI, the spec layer or the registry database.

| spec name          | parameters (pydantic, extra="forbid")  | function                          |
| ------------------ | -------------------------------------- | --------------------------------- |
| linear             | params.LinearParams                    | dense.linear                      |
| task_arithmetic    | params.TaskArithmeticParams            | dense.task_arithmetic             |
| ties               | params.TiesParams                      | dense.ties                        |
| dare_linear        | params.DareLinearParams                | dense.dare_linear                 |
| dare_ties          | params.DareTiesParams                  | dense.dare_ties                   |
| expert_merging     | expert_merging.ExpertMergingParams     | expert_merging.expert_merging     |
| expert_merging++   | expert_merging.ExpertMergingPlusParams | expert_merging.expert_merging_plus|
| m_smoe (moe_merge) | m_smoe.MSMoEParams (+ compress)        | m_smoe.m_smoe_state_dict          |
| uniform (baseline) | m_smoe.UniformMergeParams              | m_smoe.uniform_merge_state_dict   |

The same tables as code: merge.registry.DENSE_METHODS, CALIBRATED_METHODS, MOE_METHODS.
Dense merges work one tensor at a time (stream a checkpoint with merge.state_dict.merge_tensor)
or over whole state dicts (merge.state_dict.merge_state_dicts). M-SMoE needs routing statistics
from merge.routing_stats.collect_routing_stats. Every bad input raises merge.MergeError.
"""

from merge.errors import MergeError

__all__ = ["MergeError"]
