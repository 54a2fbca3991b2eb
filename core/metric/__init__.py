"""The metric-learning heart: distances, triplet categories and mining algebra, the miners,
the losses, the triplet inspector, and the registry that names them. Torch, no storage."""
