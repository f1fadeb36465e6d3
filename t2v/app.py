"""The web app: a local Gradio page over a T2VPipeline. A prompt in, a video out, with its settings, and a gallery
of every video this run has made.

    python app.py                          # the shipped default model, on http://127.0.0.1:7860
    python app.py --model runs/x/pipeline --host 0.0.0.0 --port 8000

Every request goes through `t2v.generation.check_generation`, the checks generate.py makes, and a refused one is
shown as its one-line message. Each run writes into a new folder under --out-dir: `00000.mp4` with its settings
in `00000.json`, and `manifest.jsonl` (generate.py's rows), so the folder can be scored like generate.py's.
Gradio is an optional dependency: pip install ".[app]".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from t2v.data.video import write_video
from t2v.generation import GenerationSettings, check_generation, manifest_row, sample_videos

INSTALL = 'the web app needs Gradio, an optional extra: pip install ".[app]" (or pip install "t2v[app]")'
TITLE = "t2v: text to video"
CSS = "#video video, #gallery video { image-rendering: pixelated; }"  # small clips shown large stay sharp


@dataclass
class Result:
    """One video the app made: where it is, its settings file, and its manifest row."""

    video: Path
    settings_file: Path
    row: dict


class Studio:
    """The app's state: a pipeline, the folder this run writes into, and what it has made (in order)."""

    def __init__(self, pipe, run_dir: str | os.PathLike, model_name: str = "in memory"):
        self.pipe = pipe
        self.run_dir = Path(run_dir)
        self.model_name = model_name
        self.results: list[Result] = []

    @property
    def animates_images(self) -> bool:
        """Whether the model takes a given first frame (a frame-conditioned transformer)."""
        return bool(getattr(self.pipe.transformer.config, "frame_conditioning", False))

    def defaults(self) -> GenerationSettings:
        """The pipeline's saved settings, which the page's fields start at."""
        return GenerationSettings().resolved(self.pipe)

    def request(self, prompt: str, negative_prompt: str | None = None, seed: int | None = 0,
                random_seed: bool = False, steps: int | None = None, guidance: float | None = None,
                frames: int | None = None, height: int | None = None, width: int | None = None,
                image: str | None = None) -> tuple[int, GenerationSettings]:
        """The seed and settings of a request from the page's fields, after every check generate.py makes
        (`check_generation`; ValueError naming the bad value). An empty field (None) takes the pipeline's saved
        default; `random_seed` draws the seed; `image`, a file to animate (frame-conditioned models)."""
        if random_seed:
            seed = random.SystemRandom().randrange(2**32)
        requested = GenerationSettings(num_frames=frames, height=height, width=width, num_inference_steps=steps,
                                       guidance_scale=guidance, negative_prompt=negative_prompt or None, batch_size=1,
                                       image=image or None)
        return seed, check_generation(self.pipe, [prompt], [seed], requested)

    def generate(self, prompt: str, seed: int, settings: GenerationSettings, on_step=None) -> Result:
        """Sample a checked request (`request`), write the video and its settings. `on_step(done, total)` after
        each denoising step."""
        video = sample_videos(self.pipe, [prompt], [seed], settings, on_step)[0]  # (F, H, W, 3) uint8
        return self._write(prompt, seed, settings, video)

    def _write(self, prompt: str, seed: int, settings: GenerationSettings, video) -> Result:
        # Each file is written under a temporary name and renamed, so the folder never holds half a video.
        index = len(self.results)
        name = f"{index:05d}.{settings.format}"
        row = manifest_row(prompt, seed, name, settings)
        partial = self.run_dir / f".partial-{name}"
        write_video(partial, video, settings.fps)
        os.replace(partial, self.run_dir / name)
        settings_file = self.run_dir / f"{index:05d}.json"
        partial = self.run_dir / f".partial-{settings_file.name}"
        partial.write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")
        os.replace(partial, settings_file)
        with open(self.run_dir / "manifest.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        result = Result(self.run_dir / name, settings_file, row)
        self.results.append(result)
        return result

    def gallery(self) -> list[tuple[str, str]]:
        """(video path, caption) of every result, newest first."""
        return [(str(r.video), f"{r.row['prompt']} (seed {r.row['seed']})") for r in reversed(self.results)]


def build_demo(studio: Studio):
    """The Gradio page over `studio`."""
    import gradio as gr

    d = studio.defaults()

    def check(*fields):
        """A refused request shows its message and leaves the outputs as they are (`run` is not called)."""
        try:
            studio.request(*fields)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from None

    def run(*fields, progress=gr.Progress()):  # noqa: B008 (how Gradio hands a function its progress bar)
        seed, settings = studio.request(*fields)
        progress(0, desc="encoding the prompt")

        def on_step(done, total):
            progress((done, total), desc="denoising" if done < total else "decoding")

        result = studio.generate(fields[0], seed, settings, on_step)
        return (str(result.video), result.row, [str(result.video), str(result.settings_file)], seed,
                studio.gallery())

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}\nModel: `{studio.model_name}`. Videos are written to "
                    f"`{studio.run_dir}`.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder="a large blue square moving up on a white background")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                    random_seed = gr.Checkbox(label="Random seed", value=False, elem_id="random-seed")
                with gr.Row():
                    steps = gr.Number(label="Steps", value=d.num_inference_steps, precision=0, elem_id="steps")
                    guidance = gr.Number(label="Guidance", value=d.guidance_scale, elem_id="guidance")
                with gr.Row():
                    frames = gr.Number(label="Frames", value=d.num_frames, precision=0, elem_id="frames")
                    height = gr.Number(label="Height", value=d.height, precision=0, elem_id="height")
                    width = gr.Number(label="Width", value=d.width, precision=0, elem_id="width")
                if studio.animates_images:  # a frame-conditioned model: image-to-video
                    image = gr.Image(label="Image to animate (optional)", type="filepath", elem_id="image")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                video = gr.Video(label="Video", elem_id="video", autoplay=True, loop=True, height=320)
                settings = gr.JSON(label="Settings", elem_id="settings")
                files = gr.File(label="Download: video and settings", file_count="multiple", elem_id="files")
        gallery = gr.Gallery(label="This run's videos", columns=6, fit_columns=False, height=260,
                             object_fit="contain", elem_id="gallery")
        fields = [prompt, negative, seed, random_seed, steps, guidance, frames, height, width]
        if studio.animates_images:
            fields.append(image)
        checked = button.click(check, fields, None, concurrency_limit=None, show_progress="hidden")
        checked.success(run, fields, [video, settings, files, seed, gallery], show_progress_on=video)
        demo.load(studio.gallery, None, gallery)  # a reloaded page shows what was made before
    return demo


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="A local web page that generates videos from text.")
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--out-dir", default="outputs/app", help="each run writes into a new folder inside this one")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer's blocks (the first video pays the compilation)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog or os.path.basename(sys.argv[0]) or "t2v-app")
    args = parser.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        parser.error(INSTALL)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port} must be in 1..65535")
    import t2v
    from t2v.pipelines.loading import load_pipeline

    model_dir = args.model or t2v.DEFAULT_MODEL
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"--out-dir {args.out_dir!r} is an existing file")
    try:
        pipe = load_pipeline(model_dir, args.device, compile=args.compile)
    except ValueError as error:
        parser.error(str(error))
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=out_dir)  # new: nothing is overwritten
    demo = build_demo(Studio(pipe, run_dir, args.model or "the shipped default"))
    print(f"videos go to {run_dir}", flush=True)
    demo.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port,
                                                   allowed_paths=[run_dir], css=CSS)
    return 0


__all__ = ["Studio", "build_demo", "main"]
