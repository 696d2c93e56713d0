"""Former home of the published-code restatement, now ``insid3_fast.testing.published`` (the test oracle).

Kept so that ``from insid3_fast import reference`` and ``reference.segment_patches(...)`` keep
working; new code imports ``insid3_fast.testing.published``.
"""

from .testing.published import *  # noqa: F401,F403
from .testing.published import (agglomerative_labels, backward_votes, cluster_prototypes,  # noqa: F401
                                downsample_mask, forward_mask, grid_average_linkage, grid_neighbours,
                                locate_candidates, reference_prototype, seed_and_aggregate, segment_patches,
                                segment_patches_grid)
