"""Manifests, decoding, buckets, the sampler and the dataset on tiny files written here."""

import csv
import json
import os

import imageio
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from t2v.data.buckets import Bucket, BucketBatchSampler, assign_buckets, parse_buckets
from t2v.data.dataset import VideoTextDataset, collate_skip_none
from t2v.data.manifest import COLUMN_PRESETS, load_manifest
from t2v.data.video import BadSample, ClipTooShort, VideoDecodeError, read_clip

STEP = 12  # brightness per frame index in the counting video


def write_counting_video(path, num_frames, fps=8, height=32, width=48):
    """Frame i is uniformly grey at brightness i * STEP."""
    frames = np.stack([np.full((height, width, 3), i * STEP, np.uint8) for i in range(num_frames)])
    imageio.mimwrite(path, frames, fps=fps, codec="libx264", macro_block_size=1, quality=10)


def frame_indices(clip):
    return [round(float(frame.mean()) / STEP) for frame in clip]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    os.makedirs(root / "clips")
    write_counting_video(str(root / "clips" / "count.mp4"), 20)
    write_counting_video(str(root / "clips" / "short.mp4"), 4)
    # Image: left 6 columns red, the rest blue; lossless.
    image = np.zeros((32, 48, 3), np.uint8)
    image[:, :6, 0] = 255
    image[:, 6:, 2] = 255
    Image.fromarray(image).save(root / "clips" / "still.png")
    (root / "clips" / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    return root


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------- manifests


def test_csv_manifest_resolves_paths_and_parses_columns(media):
    path = media / "m.csv"
    write_csv(path, ["path", "caption", "frames", "fps", "source"],
              [["clips/count.mp4", "a counting clip", "20", "8", "mine"], ["clips/still.png", "a still", "", "", "x"]])
    video, image = load_manifest(str(path))
    assert video["path"] == str(media / "clips" / "count.mp4")
    assert (video["frames"], video["fps"], video["width"]) == (20, 8.0, None)
    assert video["source"] == "mine" and not video["is_image"]
    assert image["is_image"] and image["frames"] is None

    other_root = load_manifest(str(path), root="/data")
    assert other_root[0]["path"] == "/data/clips/count.mp4"


def test_jsonl_manifest_keeps_extra_columns(media):
    path = media / "m.jsonl"
    rows = [{"video": "clips/count.mp4", "text": "grey", "record": {"shapes": [1, 2]}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (row,) = load_manifest(str(path), columns={"path": "video", "caption": "text"})
    assert row["path"] == str(media / "clips" / "count.mp4")
    assert row["caption"] == "grey" and row["record"] == {"shapes": [1, 2]}
    assert "video" not in row and "text" not in row


def test_webvid_column_mapping(media):
    path = media / "webvid.csv"
    write_csv(path, ["videoid", "contentUrl", "duration", "page_dir", "name"],
              [["1", "clips/count.mp4", "PT00H00M02S", "x", "people walking"]])
    (row,) = load_manifest(str(path), columns=COLUMN_PRESETS["webvid"])
    assert row["path"] == str(media / "clips" / "count.mp4") and row["caption"] == "people walking"
    assert row["videoid"] == "1"


def test_missing_column_names_column_and_file(media):
    path = media / "bad.csv"
    write_csv(path, ["video", "caption"], [["clips/count.mp4", "x"]])
    with pytest.raises(ValueError, match=r"'path'.*bad\.csv|bad\.csv.*'path'"):
        load_manifest(str(path))
    with pytest.raises(ValueError, match="'clip'"):
        load_manifest(str(path), columns={"path": "clip"})
    write_csv(path, ["path", "caption", "frames"], [["a.mp4", "x", "many"]])
    with pytest.raises(ValueError, match="frames"):
        load_manifest(str(path))


# ---------------------------------------------------------------- decoding


def test_read_clip_every_frame_and_half_fps(media):
    path = str(media / "clips" / "count.mp4")
    clip = read_clip(path, 10, height=32, width=48)
    assert clip.shape == (10, 32, 48, 3) and clip.dtype == np.uint8
    assert frame_indices(clip) == list(range(10))
    assert frame_indices(read_clip(path, 10, fps=4, height=32, width=48)) == list(range(0, 20, 2))
    assert frame_indices(read_clip(path, 5, fps=8, height=32, width=48, start=1.0)) == [8, 9, 10, 11, 12]


def test_read_clip_random_start_is_reproducible_and_in_range(media):
    path = str(media / "clips" / "count.mp4")
    starts = set()
    for seed in range(6):
        a = read_clip(path, 4, fps=4, height=16, width=16, start="random", rng=np.random.default_rng(seed))
        b = read_clip(path, 4, fps=4, height=16, width=16, start="random", rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(a, b)
        indices = frame_indices(a)
        assert indices == list(range(indices[0], indices[0] + 8, 2)) and indices[-1] <= 19
        starts.add(indices[0])
    assert len(starts) > 1


def test_resize_keeps_aspect_and_centre_crops(media):
    path = str(media / "clips" / "still.png")
    full = read_clip(path, 1, height=32, width=48)
    assert full.shape == (1, 32, 48, 3) and full[0, 0, 0, 0] == 255  # untouched: red at the left
    square = read_clip(path, 1, height=16, width=16)  # 32x48 -> 16x24 -> centre 16 columns from 4
    assert square.shape == (1, 16, 16, 3)
    assert square[..., 0].max() == 0 and square[..., 2].min() == 255  # red strip cropped off
    video = read_clip(str(media / "clips" / "count.mp4"), 3, height=20, width=20)
    assert video.shape == (3, 20, 20, 3)


def test_bad_files_raise_specific_errors(media):
    with pytest.raises(ClipTooShort):
        read_clip(str(media / "clips" / "short.mp4"), 8, height=16, width=16)
    with pytest.raises(ClipTooShort):
        read_clip(str(media / "clips" / "count.mp4"), 12, fps=4, height=16, width=16, start="random")
    with pytest.raises(VideoDecodeError) as missing:
        read_clip(str(media / "clips" / "nope.mp4"), 4, height=16, width=16)
    assert missing.value.reason == "missing"
    with pytest.raises(VideoDecodeError) as corrupt:
        read_clip(str(media / "clips" / "broken.mp4"), 4, height=16, width=16)
    assert corrupt.value.reason == "corrupt" and isinstance(corrupt.value, BadSample)
    with pytest.raises(ValueError, match="non-negative"):
        read_clip(str(media / "clips" / "count.mp4"), 2, height=16, width=16, start=-1.0)
    with pytest.raises(ValueError, match="num_frames"):
        read_clip(str(media / "clips" / "count.mp4"), 0, height=16, width=16)


# ---------------------------------------------------------------- buckets


def test_assign_buckets():
    buckets = parse_buckets([
        {"frames": 1, "height": 16, "width": 16, "batch_size": 4},
        {"frames": 9, "height": 16, "width": 16, "batch_size": 2},
        {"frames": 17, "height": 32, "width": 32, "batch_size": 1},
    ])
    rows = [
        {"is_image": True},
        {"is_image": False},  # no metadata -> first video bucket
        {"is_image": False, "frames": 40, "height": 64, "width": 64},
        {"is_image": False, "frames": 12, "height": 64, "width": 64},
        {"is_image": False, "frames": 40, "height": 20, "width": 64},
        {"is_image": False, "frames": 5},
        {"is_image": False, "frames": 30, "fps": 24},  # 30 frames at 24 fps -> 10 frames at 8 fps
    ]
    bucket_ids, skipped = assign_buckets(rows, buckets, fps=8)
    assert bucket_ids == [0, 1, 2, 1, 1, None, 1]
    assert skipped == {"video_too_small": 1}
    _, skipped = assign_buckets([{"is_image": True}], buckets[1:])
    assert skipped == {"image_no_bucket": 1}
    with pytest.raises(ValueError, match="batch_size"):
        parse_buckets([{"frames": 1, "height": 16, "width": 16, "batch_size": 0}])


def test_buckets_follow_aspect_ratio():
    buckets = parse_buckets([
        {"frames": 17, "height": 256, "width": 256, "batch_size": 4},
        {"frames": 17, "height": 192, "width": 336, "batch_size": 4},
        {"frames": 17, "height": 336, "width": 192, "batch_size": 4},
        {"frames": 17, "height": 128, "width": 128, "batch_size": 8},
    ])
    rows = [{"frames": 40, "height": h, "width": w} for h, w in ((720, 1280), (1280, 720), (720, 720), (150, 400))]
    bucket_ids, skipped = assign_buckets(rows, buckets)
    # landscape, portrait, square (the larger square), and a wide clip too small for 192x336: the largest square
    assert bucket_ids == [1, 2, 0, 3] and not skipped


def make_sampler(rank=0, world_size=1, seed=3):
    buckets = [Bucket(1, 8, 8, 3), Bucket(9, 8, 8, 2)]
    bucket_ids = [i % 3 if i % 3 < 2 else None for i in range(60)]  # 20 each in 0 and 1, 20 unassigned
    return BucketBatchSampler(bucket_ids, buckets, seed=seed, rank=rank, world_size=world_size)


def test_sampler_is_deterministic_and_bucket_pure():
    sampler = make_sampler()
    first = list(sampler)
    assert first == list(make_sampler())
    assert len(first) == len(sampler) == 20 // 3 + 20 // 2
    for batch in first:
        assert len({i % 3 for i in batch}) == 1 and batch[0] % 3 != 2
        assert len(batch) == (3 if batch[0] % 3 == 0 else 2)
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(make_sampler(seed=4)) != first


def test_sampler_shards_disjoint_equal_length():
    rank0, rank1 = list(make_sampler(0, 2)), list(make_sampler(1, 2))
    assert len(rank0) == len(rank1) == 16 // 2
    indices0, indices1 = {i for b in rank0 for i in b}, {i for b in rank1 for i in b}
    assert not indices0 & indices1
    interleaved = [batch for pair in zip(rank0, rank1) for batch in pair]
    assert interleaved == list(make_sampler())[:16]


def test_sampler_resume_mid_epoch():
    sampler = make_sampler()
    sampler.set_epoch(2)
    full = list(sampler)
    it = iter(sampler)
    for _ in range(5):
        next(it)
    state = sampler.state_dict()
    assert state == {"epoch": 2, "batches_done": 5}

    resumed = make_sampler()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop re-entering the same epoch keeps the position
    assert list(resumed) == full[5:]
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(full)


def test_sampler_resume_two_ranks_to_one():
    full = list(make_sampler())
    ranks = [make_sampler(r, 2) for r in range(2)]
    iterators = [iter(s) for s in ranks]
    for _ in range(3):
        for it in iterators:
            next(it)
    states = [s.state_dict() for s in ranks]
    assert states[0] == states[1] == {"epoch": 0, "batches_done": 6}
    # Prefetching loaders: the count passed in wins over what the sampler handed out.
    assert ranks[0].state_dict(consumed=2)["batches_done"] == 4

    single = make_sampler()
    single.load_state_dict(states[0])
    assert list(single) == full[6:]


# ---------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def manifest_rows(media):
    path = media / "all.csv"
    write_csv(path, ["path", "caption"], [
        ["clips/count.mp4", "counting"],
        ["clips/still.png", "still"],
        ["clips/broken.mp4", "broken"],
        ["clips/gone.mp4", "gone"],
        ["clips/short.mp4", "short"],
        ["clips/count.mp4", "counting again"],
    ])
    return load_manifest(str(path))


BUCKETS = [Bucket(8, 16, 16, 5), Bucket(1, 16, 16, 1)]  # one batch holds all five videos


def test_dataset_item_shapes_and_range(manifest_rows):
    dataset = VideoTextDataset(manifest_rows, BUCKETS, fps=8, start=None)
    sample = dataset[0]
    assert sample["video"].shape == (3, 8, 16, 16) and sample["video"].dtype == torch.float32
    assert sample["video"].min() >= -1 and sample["video"].max() <= 1
    assert sample["caption"] == "counting" and sample["index"] == 0
    image = dataset[(1, 1)]
    assert image["video"].shape == (3, 1, 16, 16)
    assert dataset[2].reason == "corrupt" and dataset[3].reason == "missing" and dataset[4].reason == "too_short"


def test_skipped_files_counted_through_workers(manifest_rows):
    dataset = VideoTextDataset(manifest_rows, BUCKETS, fps=8, seed=1)
    sampler = BucketBatchSampler(dataset.bucket_ids, dataset.buckets, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_skip_none, num_workers=1)
    videos = 0
    for batch in loader:
        dataset.count_skipped(batch["skipped"])
        if batch["video"] is not None:
            videos += batch["video"].shape[0]
            assert batch["video"].shape[0] == len(batch["caption"]) == len(batch["index"])
    assert videos == 3  # two counting clips and the image
    assert dataset.report_skipped() == {"corrupt": 1, "missing": 1, "too_short": 1}
    assert dataset.report_skipped() == {}


def test_collate_all_skipped_gives_empty_batch(manifest_rows):
    dataset = VideoTextDataset(manifest_rows, BUCKETS)
    batch = collate_skip_none([dataset[2], dataset[3], None])
    assert batch["video"] is None and batch["caption"] == []
    assert batch["skipped"] == ["corrupt", "missing", "unknown"]


def test_caption_dropout_is_deterministic_per_epoch_and_index(media):
    rows = [{"path": str(media / "clips" / "still.png"), "caption": f"c{i}", "is_image": True} for i in range(200)]
    buckets = [Bucket(1, 8, 8, 1)]
    dataset = VideoTextDataset(rows, buckets, caption_dropout=0.3, seed=5)
    dropped = [dataset[i]["caption"] == "" for i in range(200)]
    assert 30 < sum(dropped) < 90
    again = VideoTextDataset(rows, buckets, caption_dropout=0.3, seed=5)
    assert [again[i]["caption"] == "" for i in range(200)] == dropped
    again.set_epoch(1)
    assert [again[i]["caption"] == "" for i in range(200)] != dropped
    with pytest.raises(ValueError, match="caption_dropout"):
        VideoTextDataset(rows, buckets, caption_dropout=1.5)
