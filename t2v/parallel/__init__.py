"""Distribution, applied to finished single-device models."""
