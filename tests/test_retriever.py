"""Video-text retriever: embeddings, divided space-time attention, persistence, a short real training."""

import math
import os

import numpy as np
import pytest
import torch

from t2v.config import load_config
from t2v.eval.retrieval import retrieval_metrics
from t2v.eval.retriever import (
    VideoEncoder,
    VideoTextRetriever,
    contrastive_loss,
    frame_indices,
    preprocess_videos,
)
from t2v.train.logger import read_metrics
from t2v.train.optim import build_adamw
from t2v.train.retriever_task import (
    RetrieverTask,
    group_ids,
    param_groups,
    train_retriever,
)

TINY = dict(sample_size=32, patch_size=8, max_frames=5, hidden_size=32, num_layers=2, num_heads=2, embed_dim=32)
TINY_CONFIG = "configs/retriever/tiny.yaml"


def optimizer_for(model, overrides=()):
    """The AdamW the retriever task builds, over the parameters the model itself trains."""
    cfg = load_config(TINY_CONFIG, list(overrides))
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return build_adamw(param_groups(params, cfg.train, cfg.retriever.text_lr), cfg.train)


def embed_videos(model, videos):
    return model.embed_pixels(model.preprocess(videos))


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
        load_config(TINY_CONFIG, ["train.bach_size=4"])
    with pytest.raises(ValueError, match="data.source='folder'"):
        load_config(TINY_CONFIG, ["data.source=folder"])
    with pytest.raises(ValueError, match="retriever.text_trainable_layers=-1"):
        load_config(TINY_CONFIG, ["retriever.text_trainable_layers=-1"])


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


def test_the_shipped_retriever_loads():
    model = VideoTextRetriever.from_pretrained("t2v/assets/shapes_retriever")
    assert model.video_encoder.config.sample_size == 64 and model.encode_texts(["a red circle"]).shape == (1, 256)


def test_a_few_training_steps_beat_chance():
    torch.manual_seed(0)
    model = VideoTextRetriever(VideoEncoder(**TINY), text_head_hidden=64).train()
    optimizer = optimizer_for(model, ["train.lr=1e-3", "train.weight_decay=0"])
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


def test_training_runs_through_the_loop_on_shapes(tmp_path):
    cfg = load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "train.max_steps=2", "data.batch_size=4",
                                    "retriever.eval_size=4", "model.gradient_checkpointing=true"])
    state = train_retriever(cfg)
    assert state.step == 2
    rows = read_metrics(str(tmp_path))
    assert {"loss", "lr", "grad_norm", "batch_t2v_acc", "logit_scale"} <= set(rows[0])
    final = rows[-1]
    assert 0.0 <= final["val/canonical/t2v/R1"] <= 100.0 and "val/paraphrase/v2t/R1" in final
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints").is_dir()
    assert load_config(str(tmp_path / "config.yaml")).model.trainable == ["video_encoder.", "text_head.", "logit_scale"]
    loaded = VideoTextRetriever.from_pretrained(str(tmp_path / "model"))
    assert loaded.encode_texts(["a small red circle"]).shape == (1, 32)


class Interrupted(Exception):
    pass


def test_resume_is_exact(tmp_path):
    """Four steps in one go == two steps, a crash, and a resume to four: bitwise equal weights, EMA, optimizer."""
    from safetensors.torch import load_file

    from t2v.train import trainer

    def config(output_dir, *extra):
        return load_config(TINY_CONFIG, [f"output_dir={output_dir}", "data.batch_size=4", "retriever.eval_size=4",
                                         "train.warmup_steps=1", "train.ckpt_every=2", "train.ema_decay=0.9", *extra])

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_retriever(config(straight))

    class CrashingTask(RetrieverTask):
        """Fails when asked for the third step's batch, after step-2 was saved."""

        def next_batch(self):
            self.batches = getattr(self, "batches", 0) + 1
            if self.batches > 2:
                raise Interrupted
            return super().next_batch()

    task = CrashingTask(config(resumed))
    with pytest.raises(Interrupted):
        trainer.train(task.cfg, task)
    train_retriever(config(resumed, "resume=latest"))
    for group in ("model", "ema", "optimizer"):
        a = load_file(str(straight / "checkpoints" / "step-4" / f"{group}.safetensors"))
        b = load_file(str(resumed / "checkpoints" / "step-4" / f"{group}.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{group} {name} differs after resume"
    losses = [(row["step"], row["loss"]) for row in read_metrics(str(straight)) if "loss" in row]
    assert [(row["step"], row["loss"]) for row in read_metrics(str(resumed)) if "loss" in row] == losses
    assert [step for step, _ in losses] == [1, 2, 3, 4]


def test_task_hooks_group_decay_and_clamp_the_temperature(tmp_path):
    task = RetrieverTask(load_config(TINY_CONFIG, [f"output_dir={tmp_path}", "data.batch_size=2",
                                                   "retriever.eval_size=2"]))
    params = [(name, p) for name, p in task.model.named_parameters() if p.requires_grad]
    decay, no_decay = task.param_groups(params, task.cfg.train)
    names = {id(p): name for name, p in params}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} >= {"logit_scale", "video_encoder.cls_token",
                                                          "video_encoder.pos_spatial", "video_encoder.norm_out.weight",
                                                          "text_head.0.bias"}
    assert all(p.ndim >= 2 for p in decay["params"]) and "text_head.0.weight" in {names[id(p)] for p in decay["params"]}
    with pytest.raises(ValueError, match="task.cfg"):  # the loop given a config that trains the text encoder too
        task.param_groups(list(task.model.named_parameters()), task.cfg.train)
    with torch.no_grad():
        task.model.logit_scale.fill_(10.0)
    task.after_update(task.model)
    assert task.model.logit_scale.item() == pytest.approx(math.log(100.0))


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.source=cache", "the retriever trains on pixels"),
        ("data.frames=9", "renders 17x64x64 clips, but data.frames/height/width = 9/64/64"),
        ("data.batch_size=1", "must be >= 2"),
        ("model.trainable=[text_head]", "leave both unset"),
    ],
)
def test_task_refuses_what_it_cannot_train(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        RetrieverTask(load_config(TINY_CONFIG, [f"output_dir={tmp_path}", override]))


def test_manifest_source_buckets_images_and_videos(tmp_path):
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
    cfg = load_config(TINY_CONFIG, [
        f"output_dir={tmp_path / 'run'}", "data.source=manifest", f"data.manifest={tmp_path / 'train.csv'}",
        f"data.eval_manifest={tmp_path / 'train.csv'}", "retriever.sample_size=32", "train.max_steps=2",
        "data.buckets=[{frames: 9, height: 32, width: 32, batch_size: 4}, {frames: 1, height: 32, width: 32, batch_size: 4}]",
    ])
    task = RetrieverTask(cfg)
    frames = {task.next_batch()["video"].shape[2] for _ in range(4)}
    assert frames == {1, 9}  # one shape per batch: a bucket of videos, a bucket of images
    assert [clip.shape for clip in task.eval_sets["manifest"][0]][:2] == [(1, 32, 32, 3), (9, 32, 32, 3)]
    train_retriever(cfg)
    final = read_metrics(str(tmp_path / "run"))[-1]
    assert {"val/manifest/t2v/R1", "val/manifest/v2t/R1"} <= set(final)


def test_fine_tuned_text_layers_train_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = VideoTextRetriever(VideoEncoder(**TINY), text_head_hidden=64, text_trainable_layers=1).train()
    assert model.text_encoder.training  # dropout on while its last layer trains
    last = model.text_encoder.encoder.layer[-1].output.dense.weight
    before = last.detach().clone()
    optimizer = optimizer_for(model, ["retriever.text_lr=1e-3"])
    assert [group["lr"] for group in optimizer.param_groups] == [5e-4, 5e-4, 1e-3]  # text layers at text_lr
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


def test_two_ranks_train_as_one_rank_with_accumulation(tmp_path):
    """A real 2-process DDP launch (CPU, gloo) ends with the weights of one process accumulating 2 micro-batches:
    both consume the same global batches of the manifest, and rank gradients average as micro-batches do."""
    import socket
    import subprocess
    import sys

    import imageio.v2 as imageio
    from safetensors.torch import load_file

    videos, captions = synthetic_pairs()
    rows = ["path,caption"]
    for i, (video, caption) in enumerate(zip(videos, captions)):
        imageio.mimwrite(tmp_path / f"clip{i}.mp4", list(video), fps=8, macro_block_size=1)
        rows.append(f"clip{i}.mp4,{caption}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    args = ["scripts/train_retriever.py", "--config", TINY_CONFIG, "data.source=manifest",
            f"data.manifest={tmp_path / 'train.csv'}", "data.frames=9", "data.height=32", "data.width=32",
            "retriever.sample_size=32", "retriever.eval_size=4", "data.batch_size=2", "train.max_steps=2",
            "train.mixed_precision=fp32"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for launch, extra, out in [(torchrun, ["distributed.backend=ddp"], "ddp"), ([sys.executable], ["train.grad_accum=2"], "one")]:
        done = subprocess.run([*launch, *args, *extra, f"output_dir={tmp_path / out}"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    ddp = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-2" / "model.safetensors"))
    one = load_file(str(tmp_path / "one" / "checkpoints" / "step-2" / "model.safetensors"))
    trained = [name for name in one if not name.startswith("text_encoder.")]
    for name in trained:
        torch.testing.assert_close(ddp[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
    initial = RetrieverTask(load_config(TINY_CONFIG, ["retriever.sample_size=32"])).model.state_dict()
    assert any(not torch.allclose(one[name], initial[name]) for name in trained)  # the runs really trained
