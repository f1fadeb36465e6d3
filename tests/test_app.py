"""The web app: its requests go through generate.py's checks and sampling, and a real browser drives the page.

The browser test runs `python app.py` on the shipped default and drives it with Debian's Chromium through
Playwright. It saves a screenshot of the page under pytest's tmp dir; T2V_APP_SCREENSHOT=1 also copies it to
docs/assets/app_screenshot.png, with the video sampled at the model's own step count instead of 2 so that the
picture shows what the model makes.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "assets" / "app_screenshot.png"


def _app(*args, **kwargs):
    return subprocess.run([sys.executable, "app.py", *map(str, args)], capture_output=True, text=True, timeout=120,
                          **kwargs)


def test_without_gradio_the_app_says_how_to_install_it():
    hide = "import runpy, sys; sys.modules['gradio'] = None; sys.argv = ['app.py']; runpy.run_path('app.py', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == 'app.py: error: the web app needs Gradio, an optional extra: pip install ".[app]" (or pip install "t2v[app]")'


@pytest.mark.parametrize("args, message", [(["--model", "no/such/folder"], "has no model_index.json"),
                                           (["--port", "0"], "--port 0 must be in 1..65535"),
                                           (["--out-dir", "app.py"], "is an existing file"),
                                           (["--device", "toaster"], "is not a torch device")])
def test_bad_arguments_exit_2(args, message):
    pytest.importorskip("gradio")
    r = _app(*args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_request_is_checked_as_generate_py_checks_it_and_samples_the_same_video(tmp_path):
    from t2v.app import Studio
    from t2v.generation import GenerationSettings, generate_to_folder

    pipe = tiny_pipeline()
    studio = Studio(pipe, tmp_path / "run")
    (tmp_path / "run").mkdir()
    for fields, message in ((dict(prompt="  "), "the prompt is empty"),
                            (dict(prompt="a", steps=0), "num_inference_steps 0 must be at least 1"),
                            (dict(prompt="a", guidance=float("nan")), "guidance nan must be a finite number"),
                            (dict(prompt="a", frames=4), "num_frames 4 must be"),
                            (dict(prompt="a", seed=None), "seed None must be a whole number"),
                            (dict(prompt="a", seed=-1), "seed -1 must be a whole number")):
        with pytest.raises(ValueError, match=message):
            studio.request(**fields)
    assert not any((tmp_path / "run").iterdir())

    steps = []
    seed, settings = studio.request("a red circle", "blurry", seed=3, steps=2)
    result = studio.generate("a red circle", seed, settings, on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 2), (2, 2)]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["00000.json", "00000.mp4", "manifest.jsonl"]
    row = json.loads(result.settings_file.read_text())
    assert row == json.loads((tmp_path / "run" / "manifest.jsonl").read_text()) == result.row
    assert row["seed"] == 3 and row["num_inference_steps"] == 2 and row["negative_prompt"] == "blurry"
    # generate.py's path gives the same file for the same prompt, seed and settings
    generate_to_folder(pipe, ["a red circle"], tmp_path / "cli", [3], GenerationSettings(
        num_inference_steps=2, negative_prompt="blurry"), progress=False)
    assert (tmp_path / "cli" / "00000.mp4").read_bytes() == result.video.read_bytes()

    drawn, _ = studio.request("a red circle", seed=None, random_seed=True)
    assert 0 <= drawn < 2**32
    studio.generate("a blue square", drawn, settings)
    assert [caption for _, caption in studio.gallery()] == [f"a blue square (seed {drawn})", "a red circle (seed 3)"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_server(tmp_path):
    """`python app.py` on the shipped default, on a free port, from tmp_path (so that its videos go to the
    default outputs/app there); yields (url, output folder)."""
    pytest.importorskip("gradio")
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the app did not start:\n{server.stdout.read()}") from None
                time.sleep(0.5)
        yield url, tmp_path / "outputs" / "app"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_page_in_a_browser(app_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no system Chromium (Debian: apt-get install chromium)")
    url, out = app_server
    full_steps = os.environ.get("T2V_APP_SCREENSHOT") == "1"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium,
                                             args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#prompt textarea", timeout=60_000)
            assert page.input_value("#steps input") == "30"  # the fields start at the model's defaults

            # 1. bad input: the message of the check generate.py makes, and nothing is generated
            page.fill("#prompt textarea", "")
            page.click("#generate")
            page.get_by_text("the prompt is empty").wait_for(timeout=30_000)
            page.fill("#prompt textarea", "a large blue square moving up on a white background")
            page.fill("#steps input", "0")
            page.click("#generate")
            page.get_by_text("num_inference_steps 0 must be at least 1").wait_for(timeout=30_000)

            # 2. a video, shown and playing, with its settings, its downloads and a gallery entry
            page.fill("#steps input", "30" if full_steps else "2")
            page.click("#generate")
            duration = "() => { const v = document.querySelector('#video video'); return v && v.duration > 0; }"
            page.wait_for_function(duration, timeout=120_000)
            assert page.evaluate("document.querySelector('#video video').duration") == pytest.approx(17 / 8, abs=0.2)
            page.evaluate("document.querySelector('#video video').play()")
            page.wait_for_function("document.querySelector('#video video').currentTime > 0.2", timeout=10_000)
            settings = "".join(page.inner_text("#settings").split())  # the JSON view, without its layout
            assert f'"num_inference_steps":{30 if full_steps else 2},' in settings
            files = "".join(page.inner_text("#files").split())
            assert "00000.mp4" in files and "00000.json" in files
            page.wait_for_function("document.querySelectorAll('#gallery video, #gallery img').length >= 1",
                                   timeout=10_000)
            for close in page.locator("[data-testid=toast-close]").all():  # step 1's messages, done with
                close.click()
            page.wait_for_timeout(1000)
            page.screenshot(path=tmp_path / "app.png", full_page=True)
        finally:
            browser.close()
    (run_dir,) = out.iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["00000.json", "00000.mp4", "manifest.jsonl"]
    assert json.loads((run_dir / "00000.json").read_text())["prompt"].startswith("a large blue square")
    assert (tmp_path / "app.png").stat().st_size > 10_000
    if full_steps:
        shutil.copyfile(tmp_path / "app.png", SCREENSHOT)



def test_a_frame_conditioned_model_animates_an_image_from_the_page(tmp_path):
    """The page offers an image field only for a frame-conditioned model; the request carries it through
    generate.py's checks, and an unconditioned model refuses an image with its one-line message."""
    import numpy as np
    import PIL.Image
    import torch

    from t2v.app import Studio
    from t2v.models.dit import add_frame_conditioning

    image = tmp_path / "first.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(image)
    plain = Studio(tiny_pipeline(), tmp_path / "plain")
    assert not plain.animates_images
    with pytest.raises(ValueError, match="without frame conditioning"):
        plain.request("a", image=str(image))

    pipe = tiny_pipeline()
    pipe.transformer = add_frame_conditioning(pipe.transformer)
    with torch.no_grad():
        pipe.transformer.frame_mask_embed.weight.normal_(generator=torch.Generator().manual_seed(0))
    (tmp_path / "run").mkdir()
    studio = Studio(pipe, tmp_path / "run")
    assert studio.animates_images
    seed, settings = studio.request("a", steps=2, image=str(image))
    assert settings.image == str(image)
    result = studio.generate("a", seed, settings)
    assert result.video.stat().st_size > 0 and result.row["image"] == str(image)
    _, plain_settings = studio.request("a", steps=2)  # the image is optional
    assert plain_settings.image is None
