"""Calibration: data, models, the hook collector, the statistics store and cache, the layer runner and chain (never mergekit)."""
