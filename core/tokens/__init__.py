"""Token merging: make a transformer cheaper to run by merging similar tokens inside it.

``core.tokens.bipartite`` is the foundation every method builds on: bipartite soft
matching (ToMe, Bolya et al. 2023, https://arxiv.org/abs/2210.09461) with a
similarity-threshold mode (DyMU, https://arxiv.org/abs/2504.17040), merge and
unmerge, size tracking with proportional attention, source tracking and r schedules.

Importing this package is cheap: nothing here imports torch at module level.
"""
