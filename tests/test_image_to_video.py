"""Image-to-video and extension through T2VPipeline, generation and generate.py, on tiny models (CPU)."""

import json
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import PIL.Image
import pytest
import torch
from helpers import tiny_dit, tiny_pipeline

import t2v
from pipelines import T2VPipeline
from t2v.data.video import cover_and_crop, write_video
from t2v.generation import GenerationSettings, check_generation, generate_to_folder, sample_videos
from t2v.models.dit import add_frame_conditioning
from t2v.models.vae_utils import normalize_latents


def conditioned(pipe):
    """`pipe` with its transformer frame-conditioned and the mask embedding moved (so the mask matters)."""
    pipe.transformer = add_frame_conditioning(pipe.transformer)
    with torch.no_grad():
        pipe.transformer.frame_mask_embed.weight.normal_(generator=torch.Generator().manual_seed(0))
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return conditioned(tiny_pipeline())  # 5 frames of 8x8, VAE factors (2, 2): 3 latent frames


def encode(pipe, frames: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) of the call's size encoded as the pipeline encodes given frames: (1, C, k, h, w)."""
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 255 * 2 - 1
    with torch.no_grad():
        return normalize_latents(pipe.vae, pipe.vae.encode(pixels).latent_dist.mode())


def encode_batch(pipe, images: np.ndarray) -> torch.Tensor:
    """uint8 images (B, H, W, 3) encoded as one batch: (B, C, 1, h, w)."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)[:, :, None].float() / 255 * 2 - 1
    with torch.no_grad():
        return normalize_latents(pipe.vae, pipe.vae.encode(pixels).latent_dist.mode())


def _run(pipe, seed=0, **kwargs):
    return pipe("a red circle", generator=torch.Generator().manual_seed(seed), **kwargs).frames


def _frames(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------


def test_image_to_video_reproduces_the_given_frame_in_latent_space(pipe):
    (image,) = _frames(1)
    latents = _run(pipe, image=image, output_type="latent")
    assert latents.shape[2] == 3
    assert torch.equal(latents[:, :, :1], encode(pipe, image[None]))  # exactly, after every step
    assert not torch.allclose(latents[:, :, 1:], torch.zeros_like(latents[:, :, 1:]))
    # The decoded first frame is the VAE's reconstruction of the image (a causal decoder: frame 0 sees latent 0).
    video = _run(pipe, image=image, output_type="pt")[0, 0]  # (3, H, W) in [0, 1]
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(torch.from_numpy(image).permute(2, 0, 1)[None, :, None].float()
                                                / 127.5 - 1).latent_dist.mode()).sample[0, :, 0]
    torch.testing.assert_close(video, ((recon + 1) / 2).clamp(0, 1), rtol=0, atol=1e-5)
    # Same seed, same video; the image changes it.
    np.testing.assert_array_equal(_run(pipe, image=image), _run(pipe, image=image))
    assert np.abs(_run(pipe, image=image) - _run(pipe, image=_frames(1, seed=1)[0])).max() > 1e-3


def test_every_image_form_gives_the_same_latents_and_the_resize_rule(pipe):
    (image,) = _frames(1)
    expected = _run(pipe, image=image, output_type="latent")
    forms = [PIL.Image.fromarray(image), torch.from_numpy(image), torch.from_numpy(image).permute(2, 0, 1),
             image.astype(np.float32) / 255, torch.from_numpy(image).permute(2, 0, 1).double() / 255]
    # The forms reach the same pixels through different float32 roundings (1 ulp apart, 1.2e-6 in the latents on
    # some CPUs); a wrong scale, channel order or crop moves them by more than 1e-2.
    for form in forms:
        torch.testing.assert_close(_run(pipe, image=form, output_type="latent"), expected, rtol=0, atol=1e-5)
    # Another size: resized to cover the clip (aspect kept), then centre-cropped, as training clips are.
    big = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    rule = cover_and_crop(torch.from_numpy(big).permute(2, 0, 1)[None].float(), 8, 8)  # (1, 3, 8, 8)
    assert rule.shape == (1, 3, 8, 8)
    torch.testing.assert_close(_run(pipe, image=big, output_type="latent"),
                               _run(pipe, image=rule[0] / 255, output_type="latent"), rtol=0, atol=1e-5)


def test_one_image_per_prompt_and_videos_per_prompt(pipe):
    images = _frames(2)
    prompts = ["a red circle", "a blue square"]
    both = pipe(prompts, image=images, output_type="latent",
                generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]).frames
    # Exactly the batch's encoding (a batch rounds differently from one image, by ~1e-7).
    assert torch.equal(both[:, :, :1], encode_batch(pipe, images))
    torch.testing.assert_close(both[1, :, :1], encode(pipe, images[1:2])[0], rtol=0, atol=1e-5)
    # A list of images is the same batch; num_videos_per_prompt repeats each prompt's image.
    listed = pipe(prompts, image=list(images), output_type="latent", num_videos_per_prompt=2,
                  generator=[torch.Generator().manual_seed(s) for s in range(4)]).frames
    assert torch.equal(listed[:, :, :1], encode_batch(pipe, images).repeat_interleave(2, dim=0))


def test_extension_gives_the_first_frames_that_fill_whole_latent_frames(pipe):
    start = _frames(4)  # 4 frames: the first 3 fill 2 latent frames (1 + 2 * 1), the 4th is dropped
    latents = _run(pipe, video=start, output_type="latent")
    assert torch.equal(latents[:, :, :2], encode(pipe, start[:3]))
    for form in (start[:3], [PIL.Image.fromarray(f) for f in start[:3]], torch.from_numpy(start[:3]).permute(0, 3, 1, 2)):
        torch.testing.assert_close(_run(pipe, video=form, output_type="latent"), latents, rtol=0, atol=1e-6)
    # num_frames is the total length: 9 frames (5 latent frames) given 3 (2 latent frames).
    longer = _run(pipe, video=start, num_frames=9, output_type="latent")
    assert longer.shape[2] == 5 and torch.equal(longer[:, :, :2], encode(pipe, start[:3]))
    assert _run(pipe, video=start, num_frames=9).shape == (1, 9, 8, 8, 3)


def test_shapes_eval_gives_each_prompt_its_own_frames(pipe):
    from t2v.eval.shapes_eval import generate_frames

    prompts, images = ["a red circle", "a blue square", "a cyan circle"], _frames(3)
    videos = _frames(9, seed=1).reshape(3, 3, 8, 8, 3)  # 3 given frames per prompt
    generators = [torch.Generator().manual_seed(s) for s in (3, 4, 5)]
    direct = (pipe(prompts, image=images, generator=generators).frames * 255).round().clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.stack(generate_frames(pipe, prompts, [3, 4, 5], batch_size=2, image=images)),
                                  direct)
    extended = generate_frames(pipe, prompts, [3, 4, 5], batch_size=2, video=videos, num_frames=5)
    assert len(extended) == 3 and extended[0].shape == (5, 8, 8, 3)
    with pytest.raises(ValueError, match="2 given images and 3 prompts"):
        generate_frames(pipe, prompts, [3, 4, 5], image=images[:2])


def test_a_conditioned_model_given_nothing_is_the_text_to_video_model():
    plain = tiny_pipeline()
    converted = tiny_pipeline()
    converted.transformer = add_frame_conditioning(converted.transformer)  # zero mask embedding: the same model
    np.testing.assert_array_equal(_run(converted), _run(plain))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image=_frames(1)[0], video=_frames(3)), "not both"),
        (dict(video=_frames(5)), "give at most 3 frames"),
        (dict(image=_frames(1)[0].astype(np.int32)), "uint8, or float"),
        (dict(image=_frames(1)[0].astype(np.float32)), r"in \[0, 1\]"),
        (dict(image=np.zeros((8, 8, 4), np.uint8)), "colour channels"),
        (dict(image=np.zeros((8, 8), np.uint8)), "axes"),
        (dict(image="first.png"), "PIL image"),
        (dict(image=[]), "empty list"),
        (dict(image=_frames(3)), "3 given images for 1 prompts"),
        (dict(video=[_frames(3), _frames(1)]), "different frame counts"),
    ],
)
def test_bad_given_frames_raise(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _run(pipe, **kwargs)


def test_an_unconditioned_transformer_refuses_given_frames():
    with pytest.raises(ValueError, match="without frame conditioning"):
        _run(tiny_pipeline(), image=_frames(1)[0])


def test_the_shipped_vae_decodes_the_given_first_frame_close_to_the_image():
    """Over the shipped VAE (64x64, 17 frames) a tiny conditioned DiT's first frame is the VAE's reconstruction of
    the image: within 2 levels of 255 on average, PSNR above 29 dB against the image itself."""
    from t2v.data.shapes import render, sample_record
    from t2v.eval.pixel_metrics import psnr
    from t2v.models.loading import load_vae

    vae = load_vae(f"{t2v.DEFAULT_MODEL}/vae", 0).eval()
    base = tiny_pipeline()
    dit = add_frame_conditioning(tiny_dit(text_dim=base.text_encoder.config.hidden_size,
                                          pooled_dim=base.text_encoder.config.hidden_size,
                                          in_channels=vae.config.latent_channels))
    pipe = T2VPipeline(vae=vae, transformer=dit, scheduler=base.scheduler, text_encoder=base.text_encoder,
                       tokenizer=base.tokenizer, max_sequence_length=16,
                       generation_defaults={"num_frames": 17, "height": 64, "width": 64, "num_inference_steps": 2,
                                            "guidance_scale": 1.0})  # fmt: skip
    clip = render(sample_record(np.random.default_rng(0)))  # (17, 64, 64, 3)
    video = _run(pipe, image=clip[0], output_type="pt")[0]  # (17, 3, 64, 64)
    given = torch.from_numpy(clip[0]).permute(2, 0, 1).float() / 255
    assert (video[0] - given).abs().mean() * 255 < 2  # 0.84 levels measured
    assert psnr(video[:1], given[None]).item() > 29  # 30.5 dB measured


# ----------------------------------------------------------------------------------------------------
# Generation: files, rounds of extension, checks
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("given")
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 12, 3), dtype=np.uint8)).save(folder / "a.png")
    write_video(folder / "start.mp4", _frames(3), fps=8)
    write_video(folder / "long.mp4", _frames(6), fps=8)
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_sample_videos_from_files_and_repeated_extension(pipe, files):
    settings = check_generation(pipe, ["a", "b"], [0, 1], GenerationSettings(image=str(files / "a.png")))
    once = sample_videos(pipe, ["a", "b"], [0, 1], settings)
    assert once.shape == (2, 5, 8, 8, 3)
    # Three more rounds, each given the last 3 frames (the default overlap of a 5-frame clip) and adding 2.
    settings = check_generation(pipe, ["a", "b"], [0, 1],
                                GenerationSettings(image=str(files / "a.png"), extend_times=3))
    long = sample_videos(pipe, ["a", "b"], [0, 1], settings)
    assert long.shape == (2, 5 + 3 * 2, 8, 8, 3)
    np.testing.assert_array_equal(long[:, :5], once)  # every round keeps the video so far
    # A prompt's long video does not depend on its batch.
    alone = sample_videos(pipe, ["b"], [1], settings)
    np.testing.assert_allclose(alone[0].astype(int), long[1].astype(int), atol=1)
    extend = check_generation(pipe, ["a"], [0], GenerationSettings(extend=str(files / "start.mp4"), overlap=1,
                                                                   extend_times=1))
    assert sample_videos(pipe, ["a"], [0], extend).shape == (1, 5 + 4, 8, 8, 3)


@pytest.mark.parametrize(
    "settings,match",
    [
        (dict(image="missing.png"), "no such file"),
        (dict(image="{files}/broken.png"), "image: cannot read"),
        (dict(extend="{files}/long.mp4"), "at least 5 frames"),
        (dict(extend_times=1, overlap=2), "do not fill whole latent frames"),
        (dict(extend_times=1, overlap=5), "overlap: "),
        (dict(overlap=3), "needs extend_times"),
        (dict(extend_times=-1), "at least 0"),
        (dict(image="{files}/a.png", extend="{files}/start.mp4"), "not both"),
    ],
)
def test_generation_refuses_bad_given_frames_before_writing(pipe, files, tmp_path, settings, match):
    settings = {k: v.format(files=files) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises(ValueError, match=match):
        generate_to_folder(pipe, ["a"], tmp_path / "out", [0], GenerationSettings(**settings), progress=False)
    assert not (tmp_path / "out").exists()


def test_an_unconditioned_model_refuses_an_image_before_writing(files, tmp_path):
    with pytest.raises(ValueError, match="without frame conditioning"):
        generate_to_folder(tiny_pipeline(), ["a"], tmp_path / "out", [0],
                           GenerationSettings(image=str(files / "a.png")), progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# generate.py
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "conditioned"
    conditioned(tiny_pipeline()).save_pretrained(path)
    plain = tmp_path_factory.mktemp("model") / "plain"
    tiny_pipeline().save_pretrained(plain)
    return path, plain


def _generate(*args):
    return subprocess.run([sys.executable, "generate.py", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_generate_image_extend_and_extend_times(model_dir, files, tmp_path):
    model, _ = model_dir
    for name, flags, frames in (("image", ["--image", files / "a.png"], 5),
                                ("extend", ["--extend", files / "start.mp4", "--num-frames", 9], 9),
                                ("long", ["--image", files / "a.png", "--extend-times", 2], 5 + 2 * 2)):
        out = tmp_path / name
        r = _generate("a red circle", "--model", model, "--out-dir", out, "--format", "gif", *flags)
        assert r.returncode == 0, r.stderr
        (row,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert iio.imread(out / row["path"]).shape[0] == frames
    assert row["image"] == str(files / "a.png") and row["extend_times"] == 2 and "extend" not in row


@pytest.mark.parametrize(
    "args",
    [
        ["--image", "missing.png"],
        ["--image", "{files}/broken.png"],
        ["--extend", "{files}/long.mp4"],
        ["--image", "{files}/a.png", "--extend", "{files}/start.mp4"],
        ["--image", "{files}/a.png", "--extend-times", "-1"],
        ["--image", "{files}/a.png", "--extend-times", "1", "--overlap", "2"],
        ["--image", "{files}/a.png", "--plain"],
    ],
)
def test_bad_given_frames_exit_2(model_dir, files, tmp_path, args):
    model, plain = model_dir
    args = [arg.format(files=files) for arg in args]
    if "--plain" in args:
        args = [arg for arg in args if arg != "--plain"]
        model = plain
    out = tmp_path / "bad"
    r = _generate("a red circle", "--model", model, "--out-dir", out, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()
