"""Balancing control. The pure decision half (no Ray): ``workload`` (per-GPU work features of a
split), ``regression`` (Bayesian linear regression with per-split memory), ``predictor``
(stage times at any split, learnt online from the methodology's prior), ``migration_cost`` (seconds a
change of split costs) and ``policy`` (when to move GPUs between the pools, and where)."""

from ma_ray.control.migration_cost import MigrationCostModel
from ma_ray.control.policy import BalancingPolicy, Candidate, Decision, PolicyParams
from ma_ray.control.predictor import PredictionError, PredictorSettings, StagePrediction, StageTimePredictor
from ma_ray.parallel.step_time import PipelineShape, step_time_s
from ma_ray.parallel.workload import SplitShape, Workload

__all__ = [
    "BalancingPolicy", "Candidate", "Decision", "PolicyParams", "PipelineShape", "step_time_s",
    "MigrationCostModel", "PredictionError", "PredictorSettings", "StagePrediction", "StageTimePredictor",
    "SplitShape", "Workload",
]
