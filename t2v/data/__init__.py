"""Data: manifests, video decoding, buckets, the latent cache and Shapes World."""
