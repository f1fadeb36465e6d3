"""Does the text encoder tell the DiT which attribute belongs to which object? A linear-probe check.

    python examples/shapes_world/scripts/probe_text_binding.py [--text-encoder minilm] [--num 1200] [--json FILE]

For two-object Shapes World captions whose objects have different shapes, a logistic-regression probe
predicts the colour of one named shape (e.g. "the circle's colour") from (a) the pooled vector, which the
DiT gets through adaLN, and (b) the encoder's state at that shape's token, which the DiT's cross-attention
reads. Both captions of a pair carry the same words: the colours swapped between the objects. A probe that
reads only which colours occur can do no better than 50% on these pairs; binding information lifts it
towards 100%. Accuracies are on held-out captions (a quarter).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from t2v.data.shapes import canonical_caption, sample_record
from t2v.eval.report import write_json
from t2v.models.text_encoder import TextEmbedder


def caption_pairs(num: int, seed: int) -> list[tuple[str, str, str]]:
    """(caption, colour-swapped caption, target shape) for `num` // 2 two-object records of different shapes."""
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < num // 2:
        record = sample_record(rng, 2, "any")
        a, b = record["objects"]
        if a["shape"] == b["shape"]:
            continue
        swapped = {**record, "objects": [{**a, "colour": b["colour"]}, {**b, "colour": a["colour"]}]}
        target = a if rng.random() < 0.5 else b
        pairs.append((canonical_caption(record), canonical_caption(swapped), target["shape"]))
    return pairs


def shape_token_states(embedder: TextEmbedder, captions: list[str], shapes: list[str]):
    """Pooled vectors (N, Dp) and the state at each caption's first token of `shapes[i]` (N, D)."""
    out = embedder(captions)
    ids = embedder.tokenizer(captions, max_length=embedder.max_length, truncation=True, padding="max_length",
                             return_tensors="pt")["input_ids"]
    states = []
    for i, shape in enumerate(shapes):
        (token,) = embedder.tokenizer(shape, add_special_tokens=False)["input_ids"]
        position = int((ids[i] == token).nonzero()[0])
        states.append(out.states[i, position])
    return out.pooled.float().numpy(), torch.stack(states).float().numpy()


def colour_of(caption: str, shape: str) -> str:
    """The colour word right before `shape` in a canonical caption ('... {colour} {shape} ...')."""
    words = caption.split()
    return words[words.index(shape) - 1]


def probe_accuracy(x: np.ndarray, y: np.ndarray, train: np.ndarray, weight_decay: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression (L-BFGS) from features `x` to labels `y`."""
    classes, labels = np.unique(y, return_inverse=True)
    x = torch.as_tensor((x - x[train].mean(0)) / (x[train].std(0) + 1e-6), dtype=torch.float32)
    labels = torch.as_tensor(labels)
    linear = torch.nn.Linear(x.shape[1], len(classes))
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")
    mask = torch.as_tensor(train)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x[mask]), labels[mask])
        loss = loss + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((linear(x[~mask]).argmax(-1) == labels[~mask]).float().mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-encoder", default="minilm")
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--num", type=int, default=1200, help="captions (pairs of colour-swapped captions)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if args.num < 8:
        parser.error(f"--num {args.num} must be at least 8")
    embedder = TextEmbedder.from_pretrained(args.text_encoder, max_length=args.max_length).eval()
    pairs = caption_pairs(args.num, args.seed)
    captions, shapes, colours = [], [], []
    for caption, swapped, shape in pairs:
        captions += [caption, swapped]
        shapes += [shape, shape]
        colours += [colour_of(caption, shape), colour_of(swapped, shape)]
    pooled, token = shape_token_states(embedder, captions, shapes)
    y = np.array(colours)
    train = np.zeros(len(captions), dtype=bool)
    train[: len(captions) * 3 // 4 // 2 * 2] = True  # whole pairs on each side
    result = {"text_encoder": args.text_encoder, "captions": len(captions),
              "pooled_probe_accuracy": probe_accuracy(pooled, y, train),
              "shape_token_probe_accuracy": probe_accuracy(token, y, train),
              "pooled_cosine_of_swapped_pairs": float(np.mean([
                  pooled[i] @ pooled[i + 1] / (np.linalg.norm(pooled[i]) * np.linalg.norm(pooled[i + 1]))
                  for i in range(0, len(captions), 2)]))}
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
