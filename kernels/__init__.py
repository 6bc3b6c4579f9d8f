"""Kernels of modality-steer (installed as `steer_server.kernels`)."""
