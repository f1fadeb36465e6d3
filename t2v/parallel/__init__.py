"""Distribution, applied to finished single-device models (imports models and config, never train/ or data/).

- `t2v.parallel.distributed`: process group from the launcher (joined once), `parallelize(model, cfg)` (DDP).
- `t2v.parallel.backend`: how the training loop updates: plain / DDP or DeepSpeed ZeRO behind one object.
- `t2v.parallel.deepspeed_engine`: DeepSpeed ZeRO 1/2/3 with whole-tensor checkpoints.
- `t2v.parallel.zero_ema`: the EMA of the weights under ZeRO, sharded like the optimizer.
- `t2v.parallel.sequence`: Ulysses sequence parallelism through the DiT's self-attention hook.
"""
