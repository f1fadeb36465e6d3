"""Prompts in, video files out: the shared core of generate.py and the evaluation run."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from t2v.data.video import VIDEO_FORMATS, write_video

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

    def resolved(self, pipe) -> GenerationSettings:
        """These settings with every unset one taken from `pipe`'s saved generation defaults."""
        values = asdict(self)
        values.update(pipe.generation_settings(num_frames=self.num_frames, height=self.height, width=self.width,
                                               num_inference_steps=self.num_inference_steps,
                                               guidance_scale=self.guidance_scale, fps=self.fps))
        return GenerationSettings(**values)


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
    elif shift is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=shift,
                                                          use_dynamic_shifting=False)


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
) -> list[dict]:
    """Generate one video per prompt (own seed each) into `out_dir` with `manifest.jsonl`.

    Videos are named by prompt order (00000.mp4, ...). `out_dir` must be new or empty unless `overwrite`, which
    replaces files of the same names and removes nothing. One generation at a time writes into a folder (a
    lock file names its process; a dead process's lock is taken over). Everything is written in a temporary
    folder inside `out_dir` (the same filesystem, so the final moves are renames) and moved in only when all
    videos exist, so an interrupted run leaves nothing half-written; its leftovers are removed by the next run.
    `extra` adds per-prompt fields to the manifest rows (e.g. a ground-truth record). Every setting is resolved
    and checked by the pipeline (`generation_settings`, `check_inputs`) before anything is written.
    """
    if not prompts:
        raise ValueError("no prompts given")
    settings = (settings or GenerationSettings()).resolved(pipe)
    pipe.check_inputs(prompts, settings.negative_prompt, settings.num_frames, settings.height, settings.width, None,
                      None, settings.num_inference_steps, settings.guidance_scale)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    if settings.format not in VIDEO_FORMATS:
        raise ValueError(f"video format {settings.format!r} must be one of {VIDEO_FORMATS}")
    if settings.batch_size < 1:
        raise ValueError(f"batch size {settings.batch_size} must be at least 1")
    if settings.fps < 1:
        raise ValueError(f"fps {settings.fps} must be at least 1")
    if extra is not None and len(extra) != len(prompts):
        raise ValueError(f"got {len(extra)} extra rows for {len(prompts)} prompts")
    if (error := out_dir_error(out_dir, overwrite)) is not None:
        raise ValueError(error)
    out_dir = Path(out_dir)
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
        return _generate_into(pipe, prompts, out_dir, seeds, settings, extra, progress)
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


def _generate_into(pipe, prompts, out_dir: Path, seeds, settings, extra, progress) -> list[dict]:
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=out_dir))
    try:
        for start in range(0, len(prompts), settings.batch_size):
            batch = list(range(start, min(start + settings.batch_size, len(prompts))))
            generators = [torch.Generator(device="cpu").manual_seed(int(seeds[i])) for i in batch]
            out = pipe(
                prompt=[prompts[i] for i in batch],
                negative_prompt=settings.negative_prompt,
                num_frames=settings.num_frames,
                height=settings.height,
                width=settings.width,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                generator=generators,
                output_type="np",
            ).frames  # (B, F, H, W, 3) in [0, 1]
            videos = (np.asarray(out) * 255).round().clip(0, 255).astype(np.uint8)
            for j, i in enumerate(batch):
                name = video_name(i, settings.format)
                write_video(tmp / name, videos[j], settings.fps)
                row = {"prompt": prompts[i], "seed": int(seeds[i]), "path": name, **_settings_row(settings)}
                if extra is not None:
                    row.update(extra[i])
                rows.append(row)
            if progress:
                print(f"generated {len(rows)}/{len(prompts)} videos", flush=True)
        with open(tmp / "manifest.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == "manifest.jsonl"):  # manifest last
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _settings_row(settings: GenerationSettings) -> dict:
    row = asdict(settings)
    row.pop("batch_size")
    return row
