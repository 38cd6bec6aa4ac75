"""The engine: tile geometry, stitching, the predictor, the tile runner and the scheduler
that runs tiles on a backend, plus tissue planning and the model process environment."""
