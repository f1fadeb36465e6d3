"""Sharded checkpoint folders (t2v.train.checkpoint.save_sharded) in one process: how tensors are dealt and
split into files, that loading merges them into the same whole groups, that state.json lists and checks every
shard, that a killed save leaves nothing a resume would pick, and the memory-mapped load. The multi-process
saves and resumes are in tests/test_distributed.py and tests/test_wan_finetune.py."""

import json
import os

import pytest
import torch

from t2v.train import checkpoint as ckpt


def state() -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model": {"a.weight": torch.randn(8, 4, generator=gen), "a.bias": torch.randn(8, generator=gen),
                  "b.weight": torch.randn(16, 8, generator=gen).bfloat16(), "empty": torch.zeros(0)},
        "optimizer": {"0.exp_avg": torch.randn(8, 4, generator=gen), "0.step": torch.tensor(3.0)},
        "ema": {"a.weight": torch.randn(8, 4, generator=gen)},
    }  # fmt: skip


def stream(groups: dict):
    for group, named in groups.items():
        for name, tensor in named.items():
            yield group, name, tensor


def assert_same_groups(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for group, named in expected.items():
        assert actual[group].keys() == named.keys(), group
        for name, tensor in named.items():
            assert actual[group][name].dtype == tensor.dtype and torch.equal(actual[group][name], tensor), name


def test_dealer_balances_bytes_the_same_way_everywhere():
    sizes = [400, 100, 100, 100, 100, 50, 50]
    deals = [ckpt.Dealer(3) for _ in range(2)]
    assert [deals[0].deal(n) for n in sizes] == [deals[1].deal(n) for n in sizes] == [0, 1, 2, 1, 2, 1, 2]
    assert deals[0].held == [400, 250, 250]


def test_sharded_save_splits_into_bounded_files_and_loads_whole(tmp_path):
    saved = state()
    rng = {"rng": {"0.torch": torch.get_rng_state()}}
    # 128-byte files: a.weight (128 bytes) alone, a.bias (32) alone as b.weight (256) does not fit beside it, ...
    # and a group never shares a file with another
    path = ckpt.save_sharded(str(tmp_path), 2, stream(saved), rng, {"train_state": {"step": 2}}, max_bytes=128)
    names = sorted(os.listdir(path))
    assert names == ["ema.00000-000.safetensors", "model.00000-000.safetensors", "model.00000-001.safetensors",
                     "model.00000-002.safetensors", "model.00000-003.safetensors", "optimizer.00000-000.safetensors",
                     "optimizer.00000-001.safetensors", "rng.safetensors", "state.json"]  # fmt: skip
    listed = json.loads((tmp_path / "step-2" / "state.json").read_text())[ckpt.FILES_KEY]
    assert sorted(listed) == names[:-1]
    tensors, meta = ckpt.load_checkpoint(path)
    assert meta == {"train_state": {"step": 2}}
    assert_same_groups(tensors, {**saved, **rng})
    mapped, _ = ckpt.load_checkpoint(path, mapped=True)
    assert_same_groups(mapped, {**saved, **rng})
    mapped["model"]["a.weight"].add_(1)  # a private mapping: the file does not change
    assert ckpt.checkpoint_damage(path) is None


def test_a_damaged_shard_is_named_and_resume_falls_back(tmp_path):
    out = tmp_path / "run"
    root = ckpt.checkpoint_root(str(out))
    for step in (2, 4):
        ckpt.save_sharded(root, step, stream(state()), {}, {"step": step}, max_bytes=128)
    shard = out / "checkpoints" / "step-4" / "model.00000-001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    shard.write_bytes(bytes(data))
    assert ckpt.checkpoint_damage(str(shard.parent)) == "model.00000-001.safetensors does not match the checksum written with it"
    with pytest.warns(UserWarning, match="step-4.*model.00000-001.safetensors"):
        assert ckpt.resolve_resume("latest", str(out)) == os.path.join(root, "step-2")
    (out / "checkpoints" / "step-2" / "optimizer.00000-000.safetensors").unlink()
    with pytest.warns(UserWarning):
        assert ckpt.resolve_resume("latest", str(out)) is None
    with pytest.raises(ValueError, match="optimizer.00000-000.safetensors is missing"):
        ckpt.resolve_resume(os.path.join(root, "step-2"), str(out))


def test_a_save_killed_midway_leaves_no_checkpoint(tmp_path):
    root = str(tmp_path)
    ckpt.save_sharded(root, 2, stream(state()), {}, {"step": 2})

    def dies_midway():
        yield from list(stream(state()))[:3]
        raise KeyboardInterrupt  # the process is stopped while its shards are being written

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_sharded(root, 4, dies_midway(), {}, {"step": 4}, max_bytes=64)
    leftovers = [name for name in os.listdir(root) if name.startswith("step-4.tmp-")]
    assert len(leftovers) == 1 and os.listdir(os.path.join(root, leftovers[0]))  # half-written shards
    assert ckpt.latest_checkpoint(root) == os.path.join(root, "step-2")
    ckpt.save_sharded(root, 4, stream(state()), {}, {"step": 4})  # the next save clears the leftover
    assert sorted(os.listdir(root)) == ["step-2", "step-4"]


def test_checkpoint_format_option():
    from t2v.config import load_config

    debug = "configs/train/debug.yaml"
    assert load_config(debug, ["distributed.backend=deepspeed"]).sharded_checkpoints
    assert not load_config(debug, ["distributed.backend=deepspeed", "train.checkpoint_format=full"]).sharded_checkpoints
    assert not load_config(debug, ["distributed.backend=ddp"]).sharded_checkpoints
    with pytest.raises(ValueError, match="train.checkpoint_format=sharded needs distributed.backend=deepspeed"):
        load_config(debug, ["train.checkpoint_format=sharded"])
    with pytest.raises(ValueError, match="checkpoint_format"):
        load_config(debug, ["train.checkpoint_format=zero"])
