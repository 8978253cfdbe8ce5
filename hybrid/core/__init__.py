"""Shared definitions every layer may use: the model config, the tensor table, placement, hot-set policies,
runtime and sampling options. Torch-free."""
