"""The K2-scale planner: placement over GPUs, the performance model, hardware presets, calibration."""
