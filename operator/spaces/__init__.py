"""Search spaces: define-by-run mappings from Optuna trials to merge plans."""

from __future__ import annotations

from ..spec import DISSpace, LFSSpace, MergeSearchSpec
from .base import ModelFacts, SearchSpace, Skip
from .dis import DepthwiseIntegration
from .lfs import LayerwiseFusion


def build_space(spec: MergeSearchSpec, facts: ModelFacts) -> SearchSpace:
    space = spec.search_space
    if isinstance(space, LFSSpace):
        return LayerwiseFusion(
            facts,
            methods=list(space.methods),
            tensor_groups=space.tensor_groups,
            groups=space.layer_groups,
            layers_per_group=space.layers_per_group,
            seed=spec.search.seed,
        )
    assert isinstance(space, DISSpace)
    return DepthwiseIntegration(facts, max_depth=space.max_depth, scale_range=space.scale_range, seed=spec.search.seed)


__all__ = ["DepthwiseIntegration", "LayerwiseFusion", "ModelFacts", "SearchSpace", "Skip", "build_space"]
