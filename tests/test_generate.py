import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
from helpers import tiny_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_pipeline().save_pretrained(path)
    return path


def _generate(*args):
    return subprocess.run([sys.executable, "generate.py", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_generate_end_to_end(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square moving up\n\na red circle\n")
    out = tmp_path / "out"
    r = _generate("a green triangle", "--prompt-file", prompts, "--model", model_dir, "--out-dir", out,
                  "--seed", 3, "--steps", 2)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["a green triangle", "a blue square moving up", "a red circle"]
    assert [row["seed"] for row in rows] == [3, 4, 5]
    assert [row["path"] for row in rows] == ["00000.mp4", "00001.mp4", "00002.mp4"]
    assert rows[0]["num_inference_steps"] == 2 and rows[0]["num_frames"] is not None
    video = iio.imread(out / "00000.mp4", plugin="pyav")
    assert video.shape[0] == rows[0]["num_frames"] and video.shape[-1] == 3

    # Same seed and settings give the same video.
    again = tmp_path / "again"
    r = _generate("a green triangle", "--model", model_dir, "--out-dir", again, "--seed", 3, "--steps", 2)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(video, iio.imread(again / "00000.mp4", plugin="pyav"))


def test_generate_gif(model_dir, tmp_path):
    r = _generate("a red circle", "--model", model_dir, "--out-dir", tmp_path / "g", "--format", "gif",
                  "--steps", 1)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "g" / "00000.gif").exists()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--prompt-file", "does-not-exist.txt"],
        ["a prompt", "--steps", "0"],
        ["a prompt", "--num-frames", "4"],
        ["a prompt", "--height", "30"],
        ["a prompt", "--model", "no/such/folder"],
        ["a prompt", "--dtype", "float16", "--device", "cpu"],
        ["a prompt", "--dtype", "float16", "--device", "cpu:0"],
        ["a prompt", "--format", "avi"],
        ["a prompt", "--steps", "many"],
        ["a prompt", "--shift", "0"],
        ["a prompt", "--solver", "unipc"],
        ["a prompt", "--guidance", "nan"],
        ["a prompt", "--guidance", "inf"],
        ["a prompt", "--guidance", "-1"],
        ["a prompt", "--shift", "inf"],
        ["a prompt", "--seed", "99999999999999999999999"],
        ["a prompt", "--seed", "-1"],
        ["a prompt", "--out-dir", "generate.py"],
    ],
)
def test_bad_arguments_exit_2(model_dir, tmp_path, args):
    out = tmp_path / "bad"
    if "--model" not in args:
        args = [*args, "--model", str(model_dir)]
    if "--out-dir" not in args:
        args = [*args, "--out-dir", str(out)]
    r = _generate(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_an_existing_folder_is_refused_and_overwrite_removes_nothing(model_dir, tmp_path):
    out = tmp_path / "clips"
    out.mkdir()
    for name in ("clip0.mp4", "clip1.mp4"):
        (out / name).write_bytes(b"user video")
    (out / "manifest.jsonl").write_text('{"path": "clip0.mp4", "caption": "mine"}\n')
    r = _generate("a red circle", "--model", model_dir, "--out-dir", out, "--steps", 1)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "--overwrite" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["clip0.mp4", "clip1.mp4", "manifest.jsonl"]
    r = _generate("a red circle", "--model", model_dir, "--out-dir", out, "--steps", 1, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000.mp4", "clip0.mp4", "clip1.mp4", "manifest.jsonl"]
    assert (out / "clip1.mp4").read_bytes() == b"user video"


def test_generation_locks_its_folder_and_cleans_up_after_a_dead_run(tmp_path):
    import os

    from t2v.generation import LOCK_NAME, TEMP_PREFIX, GenerationSettings, generate_to_folder

    pipe = tiny_pipeline()
    settings = GenerationSettings(num_inference_steps=1, format="gif")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(str(os.getpid()))  # a live process (this one) holds it
    with pytest.raises(ValueError, match="being written by another generation"):
        generate_to_folder(pipe, ["a"], out, [0], settings, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(dead.stdout.strip())  # a process that has exited, killed mid-run say
    (out / f"{TEMP_PREFIX}x").mkdir()
    (out / f"{TEMP_PREFIX}x" / "00000.gif").write_bytes(b"half")
    generate_to_folder(pipe, ["a"], out, [0], settings, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["00000.gif", "manifest.jsonl"]
    # A failed run into a new folder leaves no folder behind.
    with pytest.raises(ValueError):
        generate_to_folder(pipe, ["a"], tmp_path / "new", [0], GenerationSettings(num_frames=4), progress=False)
    assert not (tmp_path / "new").exists()


def test_concurrent_generations_into_one_folder(model_dir, tmp_path):
    out = tmp_path / "shared"
    runs = [subprocess.Popen([sys.executable, "generate.py", prompt, "--model", str(model_dir), "--out-dir", str(out),
                              "--steps", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for prompt in ("a red circle", "a blue square")]
    results = [(run.wait(timeout=300), run.stdout.read(), run.stderr.read()) for run in runs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    (winner,) = [out for code, out, _ in results if code == 0]
    (loser,) = [err for code, _, err in results if code == 2]
    assert "Traceback" not in loser and len(loser.strip().splitlines()) == 1
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and winner.strip().endswith(rows[0]["prompt"])  # what was printed is what was written


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_out_dir_on_another_filesystem(model_dir, tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        r = _generate("a red circle", "--model", model_dir, "--out-dir", mount, "--steps", 1)
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in mount.iterdir()) == ["00000.mp4", "manifest.jsonl"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_set_sampler_replaces_the_schedule_and_changes_the_video():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from t2v.generation import set_sampler

    pipe = tiny_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)  # the shipped default's kind
    before = pipe.scheduler
    set_sampler(pipe, None)
    assert pipe.scheduler is before

    def sample():
        return pipe(prompt="a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                    output_type="np").frames

    default = sample()
    sigmas = {}
    for shift in (1.0, 4.0):
        set_sampler(pipe, shift)
        assert not pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == shift
        pipe.scheduler.set_timesteps(4)
        sigmas[shift] = pipe.scheduler.sigmas[:-1].numpy()  # (4,) the noise levels the 4 steps start from
    # Shift 1 is the plain linear schedule; a larger shift spends the steps at higher noise.
    np.testing.assert_allclose(sigmas[1.0], np.linspace(1.0, 0.001, 4), atol=1e-4)
    assert sigmas[4.0][0] == pytest.approx(1.0) and (sigmas[4.0][1:3] > sigmas[1.0][1:3] + 0.1).all()
    assert not np.allclose(default, sample())
    with pytest.raises(ValueError, match="must be positive"):
        set_sampler(pipe, -1.0)


def test_unipc_solver_samples_the_flow_and_nears_euler_with_many_steps():
    import torch

    from t2v.generation import set_sampler

    pipe = tiny_pipeline()

    def sample(steps):
        return pipe(prompt="a red circle", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                    output_type="latent").frames  # (1, C, f, h, w) the final latents

    set_sampler(pipe, 2.0, "euler")
    euler_4, euler_64 = sample(4), sample(64)
    set_sampler(pipe, 2.0, "unipc")
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    unipc_4, unipc_64 = sample(4), sample(64)
    # Both integrate the same ODE: with many steps they agree, and the second-order solver is closer to
    # that answer at 4 steps than Euler is.
    assert (unipc_64 - euler_64).abs().max() < 0.05 * euler_64.abs().max()
    assert (unipc_4 - euler_64).abs().mean() < (euler_4 - euler_64).abs().mean()
    with pytest.raises(ValueError, match="needs a fixed flow shift"):
        set_sampler(pipe, None, "unipc")
    with pytest.raises(ValueError, match="must be one of"):
        set_sampler(pipe, 1.0, "heun")


def test_a_long_prompt_is_cut_with_a_warning(model_dir, tmp_path):
    r = _generate("a red circle " * 200, "--model", model_dir, "--out-dir", tmp_path / "long", "--steps", 1)
    assert r.returncode == 0, r.stderr
    assert "prompt 0 has" in r.stderr and "reads the first" in r.stderr


def test_generation_reads_unset_settings_from_the_pipeline_and_checks_before_writing(tmp_path):
    from t2v.generation import GenerationSettings, generate_to_folder
    from t2v.pipelines import T2VPipeline

    pipe = tiny_pipeline()
    rows = generate_to_folder(pipe, ["a"], tmp_path / "out", [0], GenerationSettings(format="gif"), progress=False)
    d = pipe.config.generation_defaults
    assert {key: rows[0][key] for key in d} == d  # every unset setting is the saved default, written down
    bare = T2VPipeline(**pipe.components, max_sequence_length=16,
                       generation_defaults={key: d[key] for key in ("num_frames", "height", "width")})
    for settings, match in ((GenerationSettings(format="gif"), "fps is not given"),
                            (GenerationSettings(fps=8, guidance_scale=-1.0), "guidance -1.0"),
                            (GenerationSettings(fps=8, batch_size=0), "batch size 0")):
        with pytest.raises(ValueError, match=match):
            generate_to_folder(bare, ["a"], tmp_path / "new", [0], settings, progress=False)
        assert not (tmp_path / "new").exists()


def _torchrun_env() -> dict:
    # One thread in every process (torchrun's own default), so one process and two do the same arithmetic.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "T2V_DIST_TIMEOUT_MINUTES": "3"}


def _torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                "127.0.0.1", "--master_port", str(port)]
    return subprocess.run([*launcher, "generate.py", *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=_torchrun_env())


def test_two_processes_write_the_videos_and_manifest_of_one(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square moving up\na green triangle\na small red square\na circle\n")
    args = ["--prompt-file", prompts, "--model", model_dir, "--seed", 7, "--steps", 2, "--batch-size", 2]
    one = subprocess.run([sys.executable, "generate.py", *map(str, args), "--out-dir", tmp_path / "one"],
                         capture_output=True, text=True, timeout=300, env=_torchrun_env())
    assert one.returncode == 0, one.stderr
    two = _torchrun(2, *args, "--out-dir", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    names = ["00000.mp4", "00001.mp4", "00002.mp4", "00003.mp4", "00004.mp4", "manifest.jsonl"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names  # no lock, no temporary folder
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    # Batches 0 and 2 went to rank 0, batch 1 to rank 1; rank 0 prints the paths once.
    assert "rank 0: generated 3/3 videos" in two.stdout and "rank 1: generated 2/2 videos" in two.stdout
    assert two.stdout.count("<-") == 5

    # The folder rules hold: a folder that holds files is refused in one line (rank 0's), nothing changes.
    again = _torchrun(2, *args, "--out-dir", tmp_path / "two")
    assert again.returncode != 0 and again.stderr.count("generate.py: error:") == 1, again.stderr[-3000:]
    assert "--overwrite" in again.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names


FAILING_RANK = """
import sys
import torch.distributed as dist
sys.path.insert(0, "tests")
from helpers import tiny_pipeline
import t2v.generation as generation

dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == 1:
    def broken(*args, **kwargs):
        raise OSError("disk full")
    generation.write_video = broken
settings = generation.GenerationSettings(num_inference_steps=1, batch_size=1, format="gif")
try:
    generation.generate_to_folder(tiny_pipeline(), ["a", "b", "c"], sys.argv[1], [0, 1, 2], settings,
                                  progress=False, distributed=True)
except Exception as e:
    print(f"rank {rank} raised {type(e).__name__}: {e}", flush=True)
dist.destroy_process_group()
"""


def test_a_failure_on_one_rank_fails_every_rank_and_writes_nothing(tmp_path):
    import socket

    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), str(script), str(out)],
                       capture_output=True, text=True, timeout=300, env=_torchrun_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1 raised OSError: disk full" in r.stdout
    assert "rank 0 raised RuntimeError: generation failed on rank 1: OSError: disk full" in r.stdout
    assert not out.exists()  # rank 0 removed its temporary folder, its lock and the new folder


def test_compile_gives_the_same_video():
    """--compile: every transformer block compiled (one graph per block shape), the weights untouched, and the
    frames within 1e-4 of eager ones (in [0, 1]: a fortieth of one level of 255); 1.1e-6 seen on a CPU."""
    import torch

    from t2v.generation import compile_transformer

    pipe = tiny_pipeline()
    keys = list(pipe.transformer.state_dict())

    def sample():
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe(prompt=["a red circle", "a blue square"], num_inference_steps=2, generator=generators,
                    output_type="np").frames

    eager = sample()
    compile_transformer(pipe)
    assert all(block._compiled_call_impl is not None for block in pipe.transformer.blocks)
    assert list(pipe.transformer.state_dict()) == keys
    np.testing.assert_allclose(sample(), eager, rtol=0, atol=1e-4)
