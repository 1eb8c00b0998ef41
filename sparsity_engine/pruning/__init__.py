"""Pruning blocks and jobs: SparseGPTPruner (one layer), the model pipeline, calibration data, task vectors."""
