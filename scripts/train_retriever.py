"""Train the video-text retriever (the retrieval judge): python scripts/train_retriever.py --config FILE [key=value ...]"""

import argparse

from t2v.cli import user_errors
from t2v.config import load_config
from t2v.parallel.distributed import init_distributed
from t2v.train.retriever_task import train_retriever


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML overriding the defaults of t2v.config.Config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    args = parser.parse_args()
    with user_errors(__file__):
        cfg = load_config(args.config, args.overrides)
        init_distributed(cfg.distributed.sequence_parallel_size)  # once, before the task; no-op for one process
        train_retriever(cfg)


if __name__ == "__main__":
    main()
