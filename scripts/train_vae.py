"""Train the causal video VAE: python scripts/train_vae.py --config FILE [key=value ...]"""

import argparse

from t2v.cli import user_errors
from t2v.config import load_config
from t2v.parallel.distributed import init_distributed
from t2v.train.vae_task import train_vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML overriding the defaults of t2v.config.Config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    args = parser.parse_args()
    with user_errors(__file__):
        cfg = load_config(args.config, args.overrides)
        # Joins the launcher's process group (torchrun, deepspeed) before the task picks its data shard; a no-op
        # for one process.
        init_distributed(cfg.distributed.sequence_parallel_size)
        train_vae(cfg)


if __name__ == "__main__":
    main()
