import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tests import shared tiny components from tests/helpers.py and run from the repository root.
sys.path.insert(0, os.path.dirname(__file__))
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Tiny test models gain nothing from intra-op threads; one thread avoids oversubscribing small CI machines.
import torch  # noqa: E402

torch.set_num_threads(1)
