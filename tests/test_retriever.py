"""Video-text retriever: embeddings, divided space-time attention, persistence, a short real training."""

import math

import numpy as np
import pytest
import torch

from t2v.eval.retrieval import retrieval_metrics
from t2v.eval.retriever import (
    VideoEncoder,
    VideoTextRetriever,
    contrastive_loss,
    frame_indices,
    preprocess_videos,
)
from t2v.train.retriever_task import (
    embed_videos,
    group_ids,
    load_retriever_config,
    make_optimizer,
    train_retriever,
)

TINY = dict(sample_size=32, patch_size=8, max_frames=5, hidden_size=32, num_layers=2, num_heads=2, embed_dim=32)


@pytest.fixture(scope="module")
def retriever():
    torch.manual_seed(0)
    return VideoTextRetriever(VideoEncoder(**TINY), text_head_hidden=64).eval()


def synthetic_pairs():
    """8 distinct clips: a coloured square moving left or right on black, with matching captions."""
    colours = {"red": (230, 40, 40), "green": (40, 190, 70), "blue": (40, 90, 230), "yellow": (240, 220, 40)}
    videos, captions = [], []
    for name, rgb in colours.items():
        for motion, step in [("left", -6), ("right", 6)]:
            video = np.zeros((9, 32, 32, 3), dtype=np.uint8)
            for t in range(9):
                x = 13 + step * (t - 4) // 2
                video[t, 12:20, x : x + 6] = rgb
            videos.append(video)
            captions.append(f"a {name} square moving {motion}")
    return np.stack(videos), captions


def test_embeddings_are_normalised_with_the_right_shapes(retriever):
    rng = np.random.default_rng(0)
    videos = [
        rng.integers(0, 256, (17, 64, 64, 3), dtype=np.uint8),  # subsampled to 5 frames, resized
        rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8),
        rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8),  # an image
    ]
    texts = ["a red circle", "a blue square moving up", "white"]
    video_emb, text_emb = retriever.encode_videos(videos), retriever.encode_texts(texts)
    assert video_emb.shape == (3, 32) and text_emb.shape == (3, 32)
    torch.testing.assert_close(video_emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(3))
    sim = retriever.similarity(texts[:2], videos)
    assert sim.shape == (2, 3)
    torch.testing.assert_close(sim, text_emb[:2] @ video_emb.T)
    # a batch gives the same embedding as the clip alone
    torch.testing.assert_close(retriever.encode_videos(videos[:1]), video_emb[:1], atol=1e-5, rtol=1e-5)
    # the scorer interface's Frechet features: unnormalised, normalising them gives the embeddings
    features = retriever.video_features(videos)
    assert features.shape == (3, 32) and features.dtype == torch.float32
    assert not torch.allclose(features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(torch.nn.functional.normalize(features, dim=-1), video_emb)


def test_temporal_attention_is_real_and_skipped_for_one_frame():
    torch.manual_seed(0)
    encoder = VideoEncoder(**TINY).eval()
    clip, image = torch.randn(2, 3, 5, 32, 32), torch.randn(2, 3, 1, 32, 32)
    with torch.no_grad():
        clip_before, image_before = encoder(clip), encoder(image)
        for block in encoder.blocks:
            block.attn_temporal.proj.weight.normal_(std=0.2)
        clip_after, image_after = encoder(clip), encoder(image)
        reversed_after = encoder(clip.flip(2))
    assert torch.isfinite(image_after).all()
    torch.testing.assert_close(image_after, image_before)
    assert (clip_after - clip_before).abs().max() > 1e-3
    assert (reversed_after - clip_after).abs().max() > 1e-3  # frame order is seen (temporal positions)


def test_frame_sampling_and_preprocessing():
    assert frame_indices(17, 9) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert frame_indices(17, 5) == [0, 4, 8, 12, 16]
    assert frame_indices(3, 5) == [0, 1, 2]
    video = np.full((2, 17, 64, 64, 3), 255, dtype=np.uint8)
    pixels = preprocess_videos(video, 32, 5)
    assert pixels.shape == (2, 3, 5, 32, 32)
    torch.testing.assert_close(pixels, torch.ones_like(pixels))


def test_bad_configs_and_inputs_raise(retriever):
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        VideoEncoder(hidden_size=32, num_heads=3)
    with pytest.raises(ValueError, match="patch_size 6"):
        VideoEncoder(sample_size=32, patch_size=6)
    with pytest.raises(ValueError, match="exceed max_frames 5"):
        VideoEncoder(**TINY)(torch.zeros(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match="must be uint8"):
        retriever.encode_videos([np.zeros((2, 32, 32, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="list of strings"):
        retriever.encode_texts("a red circle")
    with pytest.raises(ValueError, match="unknown config key 'train.bach_size'"):
        load_retriever_config("configs/retriever/tiny.yaml", ["train.bach_size=4"])
    with pytest.raises(ValueError, match="data.source='folder'"):
        load_retriever_config(None, ["data.source=folder"])


def test_contrastive_loss_matches_hand_computation():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    video = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    scale = torch.tensor(0.0)  # exp(0) = 1
    logits = text @ video.T
    row = -torch.log_softmax(logits, 1).diagonal().mean()
    col = -torch.log_softmax(logits.T, 1).diagonal().mean()
    torch.testing.assert_close(contrastive_loss(text, video, scale), 0.5 * (row + col))
    torch.testing.assert_close(contrastive_loss(text, video, scale, torch.arange(3)), 0.5 * (row + col))
    # texts 1 and 2 describe the same content: each spreads its target over videos 1 and 2
    groups = torch.tensor([0, 1, 1])
    log_t2v, log_v2t = torch.log_softmax(logits, 1), torch.log_softmax(logits.T, 1)
    t2v = -(log_t2v[0, 0] + 0.5 * (log_t2v[1, 1] + log_t2v[1, 2]) + 0.5 * (log_t2v[2, 1] + log_t2v[2, 2])) / 3
    v2t = -(log_v2t[0, 0] + 0.5 * (log_v2t[1, 1] + log_v2t[1, 2]) + 0.5 * (log_v2t[2, 1] + log_v2t[2, 2])) / 3
    torch.testing.assert_close(contrastive_loss(text, video, scale, groups), 0.5 * (t2v + v2t))
    assert group_ids(["a", "b", "a"], "cpu").tolist() == [0, 1, 0]


def test_save_load_round_trip_gives_identical_scores(retriever, tmp_path):
    videos, captions = synthetic_pairs()
    with torch.no_grad():
        retriever.logit_scale.fill_(math.log(20.0))
    retriever.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))  # safetensors only
    loaded = VideoTextRetriever.from_pretrained(str(tmp_path))
    clips = list(videos[:3]) + [videos[3][:1]]
    torch.testing.assert_close(loaded.similarity(captions, clips), retriever.similarity(captions, clips))
    torch.testing.assert_close(loaded.logit_scale, retriever.logit_scale)
    assert loaded.video_encoder.config.max_frames == TINY["max_frames"]


def test_a_few_training_steps_beat_chance():
    torch.manual_seed(0)
    model = VideoTextRetriever(VideoEncoder(**TINY), text_head_hidden=64).train()
    cfg = load_retriever_config(None, ["train.lr=1e-3", "train.weight_decay=0"]).train
    optimizer = make_optimizer(model, cfg)
    videos, captions = synthetic_pairs()
    features = model.sentence_features(captions)
    with torch.no_grad():
        chance = retrieval_metrics(model.similarity(captions, list(videos)))["t2v/R1"]
    for _ in range(120):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = contrastive_loss(model.embed_text_features(features), embed_videos(model, videos), model.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale()
    model.eval()
    r1 = retrieval_metrics(model.similarity(captions, list(videos)))["t2v/R1"]
    assert r1 >= 75.0, f"t2v R@1 {r1} after training (chance 12.5, before training {chance})"


def test_training_script_runs_end_to_end_on_shapes(tmp_path):
    cfg = load_retriever_config(
        "configs/retriever/tiny.yaml",
        [f"output_dir={tmp_path}", "train.max_steps=2", "train.batch_size=4", "train.eval_size=4"],
    )
    metrics = train_retriever(cfg)
    assert 0.0 <= metrics["canonical/t2v/R1"] <= 100.0 and "paraphrase/v2t/R1" in metrics
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "metrics.jsonl").exists()
    loaded = VideoTextRetriever.from_pretrained(str(tmp_path / "model"))
    assert loaded.encode_texts(["a small red circle"]).shape == (1, 32)


def test_manifest_source_mixes_images_and_videos(tmp_path):
    import imageio.v2 as imageio
    from PIL import Image

    videos, captions = synthetic_pairs()
    rows = ["path,caption"]
    for i, (video, caption) in enumerate(zip(videos, captions)):
        if i % 2:
            imageio.mimwrite(tmp_path / f"clip{i}.mp4", list(video), fps=8, macro_block_size=1)
            rows.append(f"clip{i}.mp4,{caption}")
        else:
            Image.fromarray(video[0]).save(tmp_path / f"frame{i}.png")
            rows.append(f"frame{i}.png,{caption} (still)")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    cfg = load_retriever_config(
        "configs/retriever/tiny.yaml",
        [
            f"output_dir={tmp_path / 'run'}", "data.source=manifest", f"data.manifest={tmp_path / 'train.csv'}",
            f"data.eval_manifest={tmp_path / 'train.csv'}", "data.frames=9", "model.sample_size=32",
            "train.max_steps=2", "train.batch_size=8",
        ],
    )
    metrics = train_retriever(cfg)
    assert set(metrics) >= {"eval/t2v/R1", "eval/v2t/R1"}


def test_fine_tuned_text_layers_train_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = VideoTextRetriever(VideoEncoder(**TINY), text_head_hidden=64, text_trainable_layers=1).train()
    assert model.text_encoder.training  # dropout on while its last layer trains
    last = model.text_encoder.encoder.layer[-1].output.dense.weight
    before = last.detach().clone()
    optimizer = make_optimizer(model, load_retriever_config(None, ["train.text_lr=1e-3"]).train)
    videos, captions = synthetic_pairs()
    loss = contrastive_loss(
        model.embed_text_features(model.sentence_features(captions)), embed_videos(model, videos), model.logit_scale
    )
    loss.backward()
    optimizer.step()
    assert not torch.equal(last.detach(), before)
    model.eval().save_pretrained(tmp_path)
    loaded = VideoTextRetriever.from_pretrained(str(tmp_path))
    torch.testing.assert_close(loaded.encode_texts(captions), model.encode_texts(captions))
