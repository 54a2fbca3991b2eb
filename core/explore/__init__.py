"""What a finished run shows: its map (projections and their files), nearest-neighbour search,
retrieval metrics, failures, the embedding space across epochs, and exports."""
