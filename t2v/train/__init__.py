"""Training: typed config, flow matching, the DiT and VAE loops, checkpoints."""
