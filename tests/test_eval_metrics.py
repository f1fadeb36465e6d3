"""Hand-computed checks of the pure evaluation metrics."""

import math

import numpy as np
import pytest
import torch

from t2v.eval.frechet import feature_stats, frechet_distance
from t2v.eval.retrieval import retrieval_metrics, retrieval_ranks
from t2v.eval.similarity import clipsim, r_precision
from t2v.eval.temporal import (
    dynamic_degree,
    motion_magnitude,
    motion_smoothness,
    seam_profile,
    temporal_flicker,
)

KEYS = {f"{d}/{m}" for d in ("t2v", "v2t") for m in ("R1", "R5", "R10", "MedR", "MnR")}


# ----------------------------------------------------------------------------- retrieval
def test_perfect_retrieval_and_exact_keys():
    out = retrieval_metrics(np.eye(4))
    assert set(out) == KEYS
    for direction in ("t2v", "v2t"):
        assert out[f"{direction}/R1"] == 100.0
        assert out[f"{direction}/MedR"] == 1.0
        assert out[f"{direction}/MnR"] == 1.0


def test_known_ranks_give_hand_computed_recalls():
    # Row i: video (i + k) % 12 scores -k; the target (video i) is placed just below the (r_i - 1)-th
    # other, so text i ranks its video exactly r_i.
    target_ranks = [1, 1, 2, 3, 5, 6, 10, 11, 12, 1, 4, 7]
    n = len(target_ranks)
    sim = np.zeros((n, n))
    for i, r in enumerate(target_ranks):
        for k in range(1, n):
            sim[i, (i + k) % n] = -k
        sim[i, i] = -(r - 1) - 0.5
    t2v_ranks, _ = retrieval_ranks(sim)
    np.testing.assert_array_equal(t2v_ranks, target_ranks)
    out = retrieval_metrics(sim)
    assert out["t2v/R1"] == pytest.approx(25.0)  # 3 of 12
    assert out["t2v/R5"] == pytest.approx(700 / 12)  # 7 of 12
    assert out["t2v/R10"] == pytest.approx(1000 / 12)  # 10 of 12
    assert out["t2v/MedR"] == 4.5  # sorted ranks ... 4, 5 ... at positions 6, 7
    assert out["t2v/MnR"] == pytest.approx(63 / 12)


def test_small_matrix_both_directions():
    sim = [[0.9, 0.1, 0.5], [0.8, 0.3, 0.2], [0.1, 0.2, 0.7]]
    out = retrieval_metrics(torch.tensor(sim))
    assert out["t2v/R1"] == pytest.approx(200 / 3)  # text 1 prefers video 0 -> rank 2
    assert out["t2v/MnR"] == pytest.approx(4 / 3)
    assert out["v2t/R1"] == 100.0  # every column peaks at its own text


def test_ties():
    sim = np.full((4, 4), 0.3)
    pess = retrieval_metrics(sim)
    assert pess["t2v/R1"] == 0.0 and pess["t2v/MedR"] == 4.0 and pess["v2t/MnR"] == 4.0
    opt = retrieval_metrics(sim, ties="optimistic")
    assert opt["t2v/R1"] == 100.0 and opt["v2t/MedR"] == 1.0
    avg = retrieval_metrics(sim, ties="average")
    assert avg["t2v/MedR"] == 2.5 and avg["v2t/MnR"] == 2.5
    # a single candidate is rank 1 whatever the tie rule
    assert retrieval_metrics(np.full((1, 1), 0.3))["t2v/R1"] == 100.0
    with pytest.raises(ValueError, match="ties"):
        retrieval_metrics(sim, ties="random")


def test_several_captions_per_video():
    sim = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.5]])
    text_to_video = np.array([0, 0, 1, 1])
    t2v_ranks, v2t_ranks = retrieval_ranks(sim, text_to_video)
    np.testing.assert_array_equal(t2v_ranks, [1, 2, 1, 2])
    # video 0: best caption 0.9, non-captions 0.3, 0.6 -> rank 1
    # video 1: best caption 0.7, non-captions 0.1, 0.8 -> rank 2
    np.testing.assert_array_equal(v2t_ranks, [1, 2])
    out = retrieval_metrics(sim, text_to_video)
    assert out["t2v/R1"] == 50.0 and out["v2t/R1"] == 50.0 and out["v2t/MedR"] == 1.5
    # a video's own captions tying with each other do not push it down
    _, v2t_ranks = retrieval_ranks(np.array([[0.5], [0.5]]), np.array([0, 0]))
    np.testing.assert_array_equal(v2t_ranks, [1])


def test_dual_softmax_fixes_a_hub_video_under_separate_keys():
    # Video 2 is a hub: text 1 prefers it over its own video 1.
    sim = np.array([[0.8, 0.1, 0.7], [0.2, 0.6, 0.7], [0.1, 0.2, 0.9]])
    out = retrieval_metrics(sim, dual_softmax=True, temperature=0.01)
    assert set(out) == KEYS | {f"dsl/{k}" for k in KEYS}
    assert out["t2v/R1"] == pytest.approx(200 / 3)
    assert out["dsl/t2v/R1"] == 100.0
    assert out == {**retrieval_metrics(sim), **{k: v for k, v in out.items() if k.startswith("dsl/")}}
    # v2t uses the prior over videos: check against an independent computation
    prior = np.exp(sim / 0.01) / np.exp(sim / 0.01).sum(axis=1, keepdims=True)
    _, expected = retrieval_ranks(sim * prior)
    assert out["dsl/v2t/MnR"] == pytest.approx(expected.mean())


@pytest.mark.parametrize(
    "sim, kwargs, match",
    [
        (np.zeros(3), {}, "2-D"),
        (np.zeros((2, 3)), {}, "text_to_video is required"),
        (np.zeros((2, 3)), {"text_to_video": np.array([0, 3])}, "out of range"),
        (np.zeros((3, 2)), {"text_to_video": np.array([0, 0, 0])}, "video 1 has none"),
        (np.zeros((2, 2)), {"text_to_video": np.array([0.0, 1.0])}, "integer"),
        (np.array([[0.0, np.nan], [0.0, 0.0]]), {}, "finite"),
    ],
)
def test_retrieval_invalid_input(sim, kwargs, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(sim, **kwargs)


# ----------------------------------------------------------------------------- similarity
def test_clipsim_hand_values():
    text = np.array([[1.0, 0.0], [0.0, 2.0]])
    video = np.array([[3.0, 0.0], [1.0, 1.0]])
    assert clipsim(text, video) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert clipsim(text, video, scale=100) == pytest.approx(50 * (1 + 1 / math.sqrt(2)))
    np.testing.assert_allclose(clipsim(text, video, per_pair=True), [1, 1 / math.sqrt(2)])
    # per-frame embeddings are averaged over frames: frames at 0 and 90 degrees give 0.5
    frames = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    assert clipsim(text[:1], frames) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="agree"):
        clipsim(text, video[:1])


def _beats_two_of_four(n=5):
    """Each video's own prompt scores 0; two other prompts score +1, two score -1."""
    sim = np.zeros((n, n))
    for video in range(n):
        for prompt in range(n):
            if prompt != video:
                sim[prompt, video] = 1.0 if (prompt - video) % n in (1, 2) else -1.0
    return sim


def test_r_precision():
    assert r_precision(np.eye(6) + 0.1, num_distractors=5) == 1.0
    assert r_precision(np.ones((6, 6)), num_distractors=1) == 0.0  # a tie is a failure
    sim = _beats_two_of_four()
    # with all 4 others as distractors the own prompt never wins
    assert r_precision(sim, num_distractors=4) == 0.0
    # hypergeometric: P(2 random distractors both from the 2 below) = C(2,2)/C(4,2) = 1/6
    assert r_precision(sim, num_distractors=2, num_trials=3000, seed=1) == pytest.approx(1 / 6, abs=0.02)
    assert r_precision(sim, num_distractors=1, num_trials=3000, seed=1) == pytest.approx(0.5, abs=0.02)
    first = r_precision(sim, num_distractors=2, num_trials=20, seed=3)
    assert first == r_precision(sim, num_distractors=2, num_trials=20, seed=3)
    with pytest.raises(ValueError, match="num_distractors"):
        r_precision(sim, num_distractors=5)
    with pytest.raises(ValueError, match="square"):
        r_precision(np.zeros((2, 3)), num_distractors=1)


# ----------------------------------------------------------------------------- frechet
def test_frechet_identical_sets_are_zero():
    feats = np.random.default_rng(0).normal(size=(64, 4))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(torch.tensor(feats), feats) == pytest.approx(0.0, abs=1e-6)


def test_frechet_equal_covariance_is_squared_mean_distance():
    feats = np.random.default_rng(1).normal(size=(50, 3))
    shift = np.array([1.0, -2.0, 0.5])
    assert frechet_distance(feats, feats + shift) == pytest.approx(1 + 4 + 0.25, rel=1e-6)


def test_frechet_one_dimensional_gaussians():
    a = np.array([[-1.0], [1.0]])  # mean 0, unbiased variance 2
    b = np.array([[2.0], [6.0]])  # mean 4, unbiased variance 8
    mu, sigma = feature_stats(a)
    assert mu.tolist() == [0.0] and sigma.tolist() == [[2.0]]
    expected = (0 - 4) ** 2 + 2 + 8 - 2 * math.sqrt(2 * 8)  # = 18
    assert frechet_distance(a, b) == pytest.approx(expected)


def test_frechet_rank_deficient_and_invalid():
    feats = np.random.default_rng(2).normal(size=(3, 6))  # covariance of rank 2 in 6-D
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(feats[:1], feats)
    with pytest.raises(ValueError, match="widths"):
        frechet_distance(feats, feats[:, :3])


# ----------------------------------------------------------------------------- temporal
def _video(values, size=4):
    """uint8 video whose frame t is filled with values[t]: (T, size, size, 3)."""
    return np.stack([np.full((size, size, 3), v, dtype=np.uint8) for v in values])


def test_static_video():
    videos = np.stack([_video([7] * 5), _video([200] * 5)])  # (2, 5, 4, 4, 3)
    assert temporal_flicker(videos) == 0.0
    assert temporal_flicker(videos, as_score=True) == 1.0
    assert motion_smoothness(videos) == 0.0
    assert dynamic_degree(videos, threshold=0.0) == 0.0


def test_linearly_brightening_video():
    video = _video([10, 20, 30, 40, 50])
    assert temporal_flicker([video]) == 10.0
    assert temporal_flicker([video], as_score=True) == pytest.approx(1 - 10 / 255)
    assert motion_smoothness([video]) == 0.0
    # floats in [0, 1] are the same video
    assert temporal_flicker([video.astype(np.float32) / 255]) == pytest.approx(10.0, rel=1e-5)


def test_flickering_video():
    video = _video([0, 100, 0, 100])
    assert temporal_flicker([video]) == 100.0
    # frame 1 is predicted as (0 + 0) / 2 = 0 (error 100); frame 2 as 100 (error 100)
    assert motion_smoothness([video]) == 100.0
    assert motion_smoothness([video], as_score=True) == pytest.approx(1 - 100 / 255)


def test_dynamic_degree_and_lists_of_different_lengths():
    videos = [_video([5] * 3), _video([0, 10, 20, 30, 40])]
    np.testing.assert_allclose(motion_magnitude(videos), [0.0, 10.0])
    assert dynamic_degree(videos, threshold=5.0) == 0.5
    np.testing.assert_array_equal(dynamic_degree(videos, threshold=5.0, per_video=True), [False, True])
    np.testing.assert_allclose(temporal_flicker(videos, per_video=True), [0.0, 10.0])
    assert temporal_flicker(torch.from_numpy(np.stack([videos[0]]))) == 0.0


def test_small_moving_object_counts_as_motion():
    # a white pixel moves one step per frame across a black 10 x 10 frame: each frame pair differs at
    # 2 of 100 pixels by 255; the top 5% (5 pixels) average 2 * 255 / 5 = 102, the whole frame only 5.1
    video = np.zeros((4, 10, 10, 3), dtype=np.uint8)
    for t in range(4):
        video[t, 5, 2 + t] = 255
    assert temporal_flicker([video]) == pytest.approx(5.1)
    assert motion_magnitude([video]) == pytest.approx([102.0])
    assert dynamic_degree([video], threshold=10.0) == 1.0


def test_seam_profile_finds_a_jump_and_not_a_steady_ramp():
    # frames 4.. continue frames 0..3 with a jump of 70 where the ramp steps by 10
    jump, ramp = _video([0, 10, 20, 30, 100, 110, 120]), _video([0, 10, 20, 30, 40, 50, 60])
    profile = seam_profile([jump, ramp], seam=4)
    np.testing.assert_allclose(profile["frame_difference"]["seam"], [70.0, 10.0])
    np.testing.assert_allclose(profile["frame_difference"]["given"], [10.0, 10.0])
    np.testing.assert_allclose(profile["frame_difference"]["generated"], [10.0, 10.0])
    # frame 3 predicted as (20 + 100) / 2 = 60 (error 30), frame 4 as (30 + 110) / 2 = 70 (error 30)
    np.testing.assert_allclose(profile["motion_smoothness"]["seam"], [30.0, 0.0])
    np.testing.assert_allclose(profile["motion_smoothness"]["given"], [0.0, 0.0])
    np.testing.assert_allclose(profile["motion_smoothness"]["generated"], [0.0, 0.0])
    with pytest.raises(ValueError, match="seam 2"):
        seam_profile([ramp], seam=2)
    with pytest.raises(ValueError, match="fewer than 3 after seam 5"):
        seam_profile([ramp], seam=5)


def test_temporal_invalid_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        temporal_flicker([np.full((3, 2, 2, 3), 2.0)])
    with pytest.raises(ValueError, match="needs >= 3"):
        motion_smoothness([_video([0, 1])])
    with pytest.raises(ValueError, match="threshold"):
        dynamic_degree([_video([0, 1])], threshold=-1)
    with pytest.raises(ValueError, match="top_fraction"):
        motion_magnitude([_video([0, 1])], top_fraction=0)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        temporal_flicker([np.zeros((3, 4, 4), dtype=np.uint8)])


def test_repeated_prompts_match_each_others_videos():
    from t2v.eval.retrieval import same_prompt_matches

    # prompts 0 and 1 are the same string (so their rows are equal); prompt 2 differs.
    prompts = ["a red circle", "a red circle", "a blue square"]
    sim = np.array([[0.9, 0.8, 0.1], [0.9, 0.8, 0.1], [0.2, 0.3, 0.7]])
    match = same_prompt_matches(prompts)
    np.testing.assert_array_equal(match, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    t2v_ranks, v2t_ranks = retrieval_ranks(sim, match)
    # text 1's best target is video 0 (0.9): rank 1, not 2 behind its twin's video
    np.testing.assert_array_equal(t2v_ranks, [1, 1, 1])
    # video 0's twin caption ties with its own caption; without the matrix a pessimistic tie gives rank 2
    np.testing.assert_array_equal(v2t_ranks, [1, 1, 1])
    assert retrieval_metrics(sim)["v2t/R1"] == pytest.approx(100 / 3)
    assert retrieval_metrics(sim, match, dual_softmax=True)["dsl/v2t/R1"] == 100.0
    with pytest.raises(ValueError, match="text 0 has none"):
        retrieval_ranks(sim, np.zeros((3, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"bool of shape \(3, 3\)"):
        retrieval_ranks(sim, np.ones((3, 2), dtype=bool))


def test_torch_inputs_keep_float64_exactly():
    import torch

    from t2v.eval.retrieval import to_numpy

    x = torch.tensor([[1.0, 1.0 + 1e-12], [0.5, 0.25]], dtype=torch.float64)
    assert to_numpy(x)[0, 1] != to_numpy(x)[0, 0]  # a near-tie float32 would merge
    assert to_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype == np.float64
