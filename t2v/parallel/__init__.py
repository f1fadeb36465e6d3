"""Distribution, applied to finished single-device models.

- `t2v.parallel.distributed`: process group from the launcher, `parallelize(model, cfg)` (DDP), RNG rules.
- `t2v.parallel.deepspeed_engine`: DeepSpeed ZeRO 1/2/3 with whole-tensor checkpoints.
- `t2v.parallel.sequence`: Ulysses sequence parallelism through the DiT's self-attention hook.
"""
