"""Prompts in, video files out: the shared core of generate.py, the web app and the evaluation run.

`check_generation` holds every check of a request, `sample_videos` is one pipeline call on a batch (or, for a
long video, one call per extension round), and `generate_to_folder` writes a folder of videos with its
manifest, in one process or split over the ranks of a process group. A request may give a first frame
(`image`) or the start of a clip (`extend`) as a file, and ask for `extend_times` more rounds of extension.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from t2v.data.video import VIDEO_FORMATS, BadSample, read_frames, write_video
from t2v.models.vae_utils import vae_scale_factors

LOCK_NAME = ".generate.lock"  # held in the output folder while a generation writes into it
TEMP_PREFIX = ".generate.tmp-"  # temporary folders inside the output folder (same filesystem)
MAX_SEED = 2**63 - 1


@dataclass
class GenerationSettings:
    """How to generate and write videos. None: the pipeline's saved default (`T2VPipeline.generation_settings`)."""

    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    fps: int | None = None
    format: str = "mp4"
    batch_size: int = 8
    image: str | None = None  # an image file (or a video's first frame) to animate
    extend: str | None = None  # a video file whose first frames start every clip
    extend_times: int = 0  # rounds of extension after the first clip
    overlap: int | None = None  # frames each round is given from the video so far; None: `default_overlap`

    def resolved(self, pipe) -> GenerationSettings:
        """These settings with every unset one taken from `pipe`'s saved generation defaults."""
        values = asdict(self)
        values.update(pipe.generation_settings(num_frames=self.num_frames, height=self.height, width=self.width,
                                               num_inference_steps=self.num_inference_steps,
                                               guidance_scale=self.guidance_scale, fps=self.fps))
        return GenerationSettings(**values)


CONDITIONING = ("image", "extend", "extend_times", "overlap")  # the settings of given frames


def default_overlap(pipe, num_frames: int) -> int:
    """Frames an extension round is given by default: the most that fill whole latent frames up to half the
    clip's latent frames, 1 + ft ((T' - 1) // 2) (9 of a 17-frame clip with ft 4; the round appends 8)."""
    ft, _ = vae_scale_factors(pipe.vae)
    latent_frames = (num_frames - 1) // ft + 1
    return 1 + ft * ((latent_frames - 1) // 2)


def given_frames(pipe, settings: GenerationSettings) -> np.ndarray | None:
    """The frames a request gives (`settings` resolved), read from its file and sized to the clip: uint8
    (F, H, W, 3), one frame for `image`, the first 1 + ft (k - 1) of `extend` (`T2VPipeline.given_frame_count`);
    None when it gives none. Raises ValueError for an unreadable file or one with too many frames."""
    path = settings.image or settings.extend
    if path is None:
        return None
    flag = "image" if settings.image else "extend"
    try:
        frames = read_frames(path, 1 if settings.image else settings.num_frames, height=settings.height,
                             width=settings.width)
    except BadSample as e:
        raise ValueError(f"{flag}: {e}") from None
    if settings.extend and len(frames) >= settings.num_frames:
        raise ValueError(f"extend: {str(path)!r} has at least {len(frames)} frames, as many as the whole clip "
                         f"(num_frames {settings.num_frames}); give a shorter video or a larger num_frames")
    try:
        return frames[: pipe.given_frame_count(len(frames), settings.num_frames)]
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def conditioning_error(pipe, settings: GenerationSettings) -> str | None:
    """Why a request's given frames or extension rounds cannot be generated (`settings` resolved), or None."""
    if settings.image is not None and settings.extend is not None:
        return "give an image to animate or a video to extend, not both"
    if settings.extend_times < 0:
        return f"extend_times {settings.extend_times} must be at least 0"
    if settings.overlap is not None and not settings.extend_times:
        return "an overlap needs extend_times of at least 1"
    if settings.image is None and settings.extend is None and not settings.extend_times:
        return None
    if not pipe.transformer.config.frame_conditioning:
        return ("this model was trained without frame conditioning, so it cannot animate an image or extend a "
                "video; use a frame-conditioned model (t2v.models.dit.add_frame_conditioning, then fine-tuning)")
    if settings.extend_times:
        overlap = settings.overlap if settings.overlap is not None else default_overlap(pipe, settings.num_frames)
        if overlap < 1:
            return f"overlap {overlap} must be at least 1 frame"
        try:
            if pipe.given_frame_count(overlap, settings.num_frames) != overlap:
                ft, _ = vae_scale_factors(pipe.vae)
                return f"overlap {overlap} frames do not fill whole latent frames: give 1 + {ft}k frames"
        except ValueError as e:
            return f"overlap: {e}"
    return None


SOLVERS = ("euler", "unipc")


def sampler_error(shift: float | None, solver: str | None) -> str | None:
    """Why `set_sampler(pipe, shift, solver)` would refuse these values, or None when they are valid."""
    if shift is not None and not (shift > 0 and math.isfinite(shift)):
        return f"flow shift {shift} must be positive and finite"
    if solver is not None and solver not in SOLVERS:
        return f"solver {solver!r} must be one of {SOLVERS}"
    if solver == "unipc" and shift is None:
        return "solver 'unipc' needs a fixed flow shift (e.g. 3, the default model's)"
    return None


def set_sampler(pipe, shift: float | None = None, solver: str | None = None) -> None:
    """Replace the pipeline's flow-matching sampler. `shift`: a fixed flow shift, sigma -> shift * sigma /
    (1 + (shift - 1) * sigma) (SD3's and Wan's), in place of the scheduler's own schedule (the shipped default
    has a fixed shift 3; a training run's pipeline shifts by token count, Flux-style: 1.67 for 320 latent
    tokens); larger values spend more of the steps at high noise. `solver`: "euler" (diffusers'
    FlowMatchEulerDiscreteScheduler, first order) or "unipc" (its UniPCMultistepScheduler on flow sigmas, second
    order, as Wan samples; needs a shift). None keeps the scheduler's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    error = sampler_error(shift, solver)
    if error is not None:
        raise ValueError(error)
    if solver == "unipc":
        pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 flow_shift=shift)
    elif solver == "euler" and not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift or 1.0)
    elif shift is not None and isinstance(pipe.scheduler, UniPCMultistepScheduler):  # Wan's: `flow_shift`
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=shift)
    elif shift is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=shift,
                                                          use_dynamic_shifting=False)


def quiet_loading() -> None:
    """Silence the loading reports and progress bars of diffusers and transformers, which would bury an entry
    point's own one-line messages."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def compile_transformer(pipe) -> None:
    """torch.compile each repeated block of the pipeline's transformer in place (diffusers'
    `compile_repeated_blocks`; one graph serves every block of a shape, as `train.compile` does in training).
    The first call of a clip shape pays the compilation; weights and outputs stay those of the eager model, up to
    float rounding."""
    pipe.transformer.compile_repeated_blocks()


def seed_error(seed: int, count: int) -> str | None:
    """Why seeds seed, seed + 1, ..., seed + count - 1 cannot all seed a torch generator, or None."""
    if seed < 0 or seed + count - 1 > MAX_SEED:
        return f"seed {seed} must be in [0, {MAX_SEED - count + 1}] so that all {count} prompts' seeds fit 63 bits"
    return None


def guidance_error(guidance: float | None) -> str | None:
    """Why a guidance scale is refused (not finite, or negative), or None."""
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        return f"guidance {guidance} must be a finite number >= 0"
    return None


def out_dir_error(out_dir: str | os.PathLike, overwrite: bool = False) -> str | None:
    """Why generation may not write into `out_dir`, or None: it is a file, it holds files and `overwrite` is
    off, or no folder can be made there."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        return f"output folder {str(out_dir)!r} is an existing file"
    if path.is_dir():
        held = sorted(p.name for p in path.iterdir() if not p.name.startswith((LOCK_NAME, TEMP_PREFIX)))
        if held and not overwrite:
            return (f"output folder {str(out_dir)!r} already holds {len(held)} entries (e.g. {held[0]!r}); choose a "
                    f"new folder, or pass --overwrite to replace its videos and manifest.jsonl (nothing else is removed)")
        if not os.access(path, os.W_OK | os.X_OK):
            return f"output folder {str(out_dir)!r} is not writable"
        return None
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"output folder {str(out_dir)!r} cannot be made: {str(parent)!r} is not a writable folder"
    return None


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines are skipped. Raises ValueError for a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts (one prompt per line)")
    return prompts


def prompts_error(prompts: list[str]) -> str | None:
    """Why these prompts cannot be generated (none, or one empty), or None."""
    if not prompts:
        return "no prompts given"
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            return "the prompt is empty" if len(prompts) == 1 else f"prompt {i} is empty"
    return None


def check_generation(pipe, prompts: list[str], seeds: list[int], settings: GenerationSettings | None = None,
                     extra: list[dict] | None = None) -> GenerationSettings:
    """`settings` resolved against `pipe`'s saved defaults, after every check a generation makes: the prompts,
    one seed each in [0, MAX_SEED], the pipeline's `check_inputs` (clip shape, steps, guidance), format, batch size,
    fps, and the given frames (`conditioning_error`, the file read by `given_frames`). Raises ValueError naming
    the bad value; nothing is sampled or written."""
    if (error := prompts_error(prompts)) is not None:
        raise ValueError(error)
    settings = (settings or GenerationSettings()).resolved(pipe)
    pipe.check_inputs(prompts, settings.negative_prompt, settings.num_frames, settings.height, settings.width, None,
                      None, settings.num_inference_steps, settings.guidance_scale)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed {seed!r} must be a whole number in [0, {MAX_SEED}]")
    if settings.format not in VIDEO_FORMATS:
        raise ValueError(f"video format {settings.format!r} must be one of {VIDEO_FORMATS}")
    if settings.batch_size < 1:
        raise ValueError(f"batch size {settings.batch_size} must be at least 1")
    if settings.fps < 1:
        raise ValueError(f"fps {settings.fps} must be at least 1")
    if extra is not None and len(extra) != len(prompts):
        raise ValueError(f"got {len(extra)} extra rows for {len(prompts)} prompts")
    if (error := conditioning_error(pipe, settings)) is not None:
        raise ValueError(error)
    given_frames(pipe, settings)
    return settings


def sample_videos(pipe, prompts: list[str], seeds: list[int], settings: GenerationSettings,
                  on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
    """One call of the pipeline on `prompts` (one batch; `settings` as `check_generation` returns them), each
    prompt's noise from a generator seeded by its own seed. Returns uint8 videos (B, F, H, W, 3).
    `on_step(done, total)` is called after every denoising step (the pipeline's step callback).

    Given frames (`settings.image` or `settings.extend`) start every clip. With `extend_times` N, N more calls
    follow, each given the last `overlap` frames of the video so far (its generators carry on, so a prompt's
    video does not depend on its batch); each round keeps the video so far as it is and appends the frames after
    its overlap, so a video is num_frames + N (num_frames - overlap) frames long. The seam is where an appended
    frame meets a kept one: the round decoded it after its own reconstruction of the overlap, which is the kept
    frames re-encoded, so the jump there is the VAE's round-trip error plus the model's own motion.
    """
    callback = None
    if on_step is not None:
        def callback(pipe, i, t, tensors):
            on_step(i + 1, settings.num_inference_steps)
            return tensors

    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]

    def clip(given: np.ndarray | None, name: str) -> np.ndarray:
        frames = pipe(
            prompt=list(prompts),
            negative_prompt=settings.negative_prompt,
            num_frames=settings.num_frames,
            height=settings.height,
            width=settings.width,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=generators,
            output_type="np",
            callback_on_step_end=callback,
            **({} if given is None else {name: given}),
        ).frames  # (B, F, H, W, 3) in [0, 1]
        return (np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8)

    first = given_frames(pipe, settings)
    videos = clip(None if first is None else (first[0] if settings.image else first),
                  "image" if settings.image else "video")
    overlap = settings.overlap if settings.overlap is not None else default_overlap(pipe, settings.num_frames)
    for _ in range(settings.extend_times):
        rounds = clip(videos[:, -overlap:], "video")  # (B, num_frames, H, W, 3), the overlap first
        videos = np.concatenate([videos, rounds[:, overlap:]], axis=1)
    return videos


def manifest_row(prompt: str, seed: int, path: str, settings: GenerationSettings, extra: dict | None = None) -> dict:
    """A video's line of manifest.jsonl: its prompt, seed, file name and every setting it was made with."""
    row = {"prompt": prompt, "seed": int(seed), "path": path, **asdict(settings)}
    row.pop("batch_size")
    for name in CONDITIONING:  # written only when given: a text-to-video row keeps its fields
        if not row[name]:
            row.pop(name)
    return {**row, **(extra or {})}


def video_name(index: int, fmt: str) -> str:
    return f"{index:05d}.{fmt}"


def generate_to_folder(
    pipe,
    prompts: list[str],
    out_dir: str | os.PathLike,
    seeds: list[int],
    settings: GenerationSettings | None = None,
    extra: list[dict] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    distributed: bool = False,
) -> list[dict]:
    """Generate one video per prompt (own seed each) into `out_dir` with `manifest.jsonl`; returns its rows.

    Videos are named by prompt order (00000.mp4, ...). `out_dir` must be new or empty unless `overwrite`, which
    replaces files of the same names and removes nothing. One generation at a time writes into a folder (a
    lock file names its process; a dead process's lock is taken over). Everything is written in a temporary
    folder inside `out_dir` (the same filesystem, so the final moves are renames) and moved in only when all
    videos exist, so an interrupted run leaves nothing half-written; its leftovers are removed by the next run.
    `extra` adds per-prompt fields to the manifest rows (e.g. a ground-truth record). Every input is checked
    (`check_generation`) before anything is written.

    `distributed`: every rank of the initialized default process group calls this with the same arguments and
    samples its share of the batches; see `_generate_over_ranks`.
    """
    settings = check_generation(pipe, prompts, seeds, settings, extra)
    out_dir = Path(out_dir)
    # The batches are those of a one-process run, so a prompt is always sampled beside the same prompts.
    batches = [range(start, min(start + settings.batch_size, len(prompts)))
               for start in range(0, len(prompts), settings.batch_size)]
    job = (pipe, prompts, seeds, settings, extra, progress)
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed generation needs an initialized torch.distributed process group")
        if dist.get_world_size() > 1:
            return _generate_over_ranks(job, batches, out_dir, overwrite)
    with _output_folder(out_dir, overwrite) as tmp:
        rows = _write_batches(job, batches, tmp)
        ordered = [rows[i] for i in range(len(prompts))]
        _publish(tmp, out_dir, ordered)
    return ordered


def _generate_over_ranks(job: tuple, batches: list[range], out_dir: Path, overwrite: bool) -> list[dict]:
    """Batch b goes to rank b mod N. Whole batches, not single prompts, are split so that every prompt is sampled
    in the same batch as in a one-process run: batched arithmetic rounds differently from unbatched, and this
    way N processes write byte-identical videos to one process (at the same thread count). Rank 0 makes and
    locks the folder and its temporary folder; every rank writes its videos there; after all have finished
    (an all-gather of their rows, which is the barrier), rank 0 writes the one manifest in prompt order and
    moves everything in. A failure on any rank fails every rank, and nothing is moved in. On several nodes,
    `out_dir` must be on a filesystem that every rank sees."""
    rank, world = dist.get_rank(), dist.get_world_size()
    with contextlib.ExitStack() as folder:
        # 1. rank 0 takes the folder; every rank learns the temporary folder, or why the folder is refused
        shared: list = [None]
        if rank == 0:
            try:
                shared = [str(folder.enter_context(_output_folder(out_dir, overwrite)))]
            except Exception as e:  # a refused folder (ValueError) or one that cannot be made: every rank raises it
                shared = [e]
        dist.broadcast_object_list(shared, src=0)
        if isinstance(shared[0], Exception):
            raise shared[0]
        tmp = Path(shared[0])

        # 2. each rank samples its own batches
        try:
            mine, failure = _write_batches(job, batches[rank::world], tmp, tag=f"rank {rank}: "), None
        except Exception as e:  # reported to every rank below, then raised here with its traceback
            mine, failure = {}, e
        everyone: list = [None] * world
        dist.all_gather_object(everyone, (mine, None if failure is None else f"{type(failure).__name__}: {failure}"))
        if failure is not None:
            raise failure
        for other, (_, message) in enumerate(everyone):
            if message is not None:
                raise RuntimeError(f"generation failed on rank {other}: {message}")
        rows = {i: row for part, _ in everyone for i, row in part.items()}
        ordered = [rows[i] for i in range(len(rows))]

        # 3. rank 0 writes the manifest, moves everything in and releases the folder; then every rank returns
        outcome: list = [None]
        if rank == 0:
            try:
                _publish(tmp, out_dir, ordered)
                folder.close()
            except Exception as e:
                outcome = [f"{type(e).__name__}: {e}"]
                dist.broadcast_object_list(outcome, src=0)
                raise
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise RuntimeError(f"rank 0 could not write the output folder: {outcome[0]}")
    return ordered


@contextlib.contextmanager
def _output_folder(out_dir: Path, overwrite: bool):
    """Check `out_dir`, make it if new, lock it, remove an interrupted run's leftovers, and yield a new temporary
    folder inside it. On exit the temporary folder and the lock go, and a new folder left empty is removed."""
    if (error := out_dir_error(out_dir, overwrite)) is not None:
        raise ValueError(error)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = None
    try:
        lock = _lock(out_dir)
        # Checked again under the lock: another run may have filled the folder since the first check.
        if (error := out_dir_error(out_dir, overwrite)) is not None:
            raise ValueError(error)
        for leftover in out_dir.glob(f"{TEMP_PREFIX}*"):  # of an interrupted run; no other writer holds the lock
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=out_dir))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a failed run into a new folder leaves no folder


def _lock(out_dir: Path) -> Path:
    """Create `out_dir/LOCK_NAME` holding our pid; ValueError if a live process holds it."""
    lock = out_dir / LOCK_NAME
    # The pid is written first and the file linked into place (atomic, fails if the lock exists), so a lock
    # is never seen empty.
    mine = out_dir / f"{LOCK_NAME}.{os.getpid()}"
    mine.write_text(str(os.getpid()))
    try:
        return _take_lock(lock, mine, out_dir)
    finally:
        mine.unlink(missing_ok=True)


def _take_lock(lock: Path, mine: Path, out_dir: Path) -> Path:
    for _ in range(2):
        try:
            _link_or_create(mine, lock)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and _alive(pid):
                raise ValueError(f"output folder {str(out_dir)!r} is being written by another generation "
                                 f"(process {pid}); wait for it or choose another folder") from None
            lock.unlink(missing_ok=True)  # the process that held it is gone
            continue
        return lock
    raise ValueError(f"output folder {str(out_dir)!r}: could not take its lock file {LOCK_NAME}")


def _link_or_create(source: Path, target: Path) -> None:
    """Hard-link `source` to `target`, or on a filesystem without hard links create `target` exclusively
    with its content; FileExistsError either way when `target` exists."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(source.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


def _write_batches(job: tuple, batches: list[range], tmp: Path, tag: str = "") -> dict[int, dict]:
    """Sample `batches` (prompt indices) and write their videos into `tmp`; returns {prompt index: manifest row}."""
    pipe, prompts, seeds, settings, extra, progress = job
    rows = {}
    total = sum(len(batch) for batch in batches)
    for batch in batches:
        videos = sample_videos(pipe, [prompts[i] for i in batch], [seeds[i] for i in batch], settings)
        for video, i in zip(videos, batch):
            name = video_name(i, settings.format)
            write_video(tmp / name, video, settings.fps)
            rows[i] = manifest_row(prompts[i], seeds[i], name, settings, None if extra is None else extra[i])
        if progress:
            print(f"{tag}generated {len(rows)}/{total} videos", flush=True)
    return rows


def _publish(tmp: Path, out_dir: Path, rows: list[dict]) -> None:
    """Write manifest.jsonl into `tmp` and move everything in `tmp` into `out_dir`, the manifest last."""
    with open(tmp / "manifest.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=False) + "\n")
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == "manifest.jsonl"):
        os.replace(item, out_dir / item.name)
