"""The walkthrough's scripts and the documents' examples, run as a user runs them, against the session's server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils import specs
from utils.walkthrough import heading

pytestmark = pytest.mark.server  # starts tritonserver

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_run_pipeline_scripts_save_the_same_image(triton_server, tiny_model, tmp_path):
    common = ["--url", triton_server.grpc_url, "--num-inference-steps", "3", "--seed", "5", "--prompt", "a red boat"]
    out = run("scripts/run_client_side_pipeline.py", *common, "--model", str(tiny_model),
              "--output", str(tmp_path / "client.png"), cwd=tmp_path)
    assert f"saved {tmp_path / 'client.png'} (64x64, 3 steps" in out
    for script, name in (("scripts/run_bls_pipeline.py", "bls.png"), ("scripts/run_ensemble_pipeline.py", "ensemble.png")):
        out = run(script, *common, "--output", str(tmp_path / name), cwd=tmp_path)
        assert f"saved {tmp_path / name} (64x64, 3 steps" in out
    client, bls, ensemble = (np.asarray(Image.open(tmp_path / name)) for name in ("client.png", "bls.png", "ensemble.png"))
    assert client.shape == (64, 64, 3) and np.abs(client.astype(int) - bls).max() <= 2
    assert np.array_equal(bls, ensemble)  # the same loop code and networks, composed two ways


def test_image_to_image_from_a_file_the_same_three_ways(triton_server, tiny_model, tmp_path):
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[:, None, None] * 4, (1, 64, 3))).save(tmp_path / "in.png")
    common = ["--url", triton_server.grpc_url, "--num-inference-steps", "4", "--seed", "1", "--image", str(tmp_path / "in.png"),
              "--strength", "0.75"]
    run("scripts/run_client_side_pipeline.py", *common, "--model", str(tiny_model), "--output", str(tmp_path / "c.png"),
        cwd=tmp_path)
    run("scripts/run_bls_pipeline.py", *common, "--output", str(tmp_path / "b.png"), cwd=tmp_path)
    run("scripts/run_ensemble_pipeline.py", *common, "--output", str(tmp_path / "e.png"), cwd=tmp_path)
    c, b, e = (np.asarray(Image.open(tmp_path / name)).astype(int) for name in ("c.png", "b.png", "e.png"))
    assert np.abs(c - b).max() <= 2 and np.array_equal(b, e)


def test_inpainting_from_files_the_same_two_ways(triton_server, tmp_path):
    from utils.mask import box_mask

    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[:, None, None] * 4, (1, 64, 3))).save(tmp_path / "in.png")
    Image.fromarray(np.repeat(box_mask(64, 64)[0, :, :, None], 3, axis=2)).save(tmp_path / "mask.png")  # RGB: greyed
    common = ["--url", triton_server.grpc_url, "--num-inference-steps", "4", "--seed", "1", "--image",
              str(tmp_path / "in.png"), "--mask-image", str(tmp_path / "mask.png")]
    out = run("scripts/run_bls_pipeline.py", *common, "--output", str(tmp_path / "b.png"), cwd=tmp_path)
    assert "(64x64, 4 of 4 steps (strength 1)" in out  # inpainting's default strength, as diffusers'
    run("scripts/run_ensemble_pipeline.py", *common, "--output", str(tmp_path / "e.png"), cwd=tmp_path)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(Image.open(tmp_path / "e.png")))


def test_request_options_from_the_command_line(triton_server, tiny_model, tmp_path):
    common = ["--url", triton_server.grpc_url, "--num-inference-steps", "3", "--seed", "2", "--scheduler",
              "EulerAncestralDiscreteScheduler", "--num-images-per-prompt", "2", "--height", "48", "--width", "80"]
    outputs = {}
    for script, extra in (("scripts/run_client_side_pipeline.py", ["--model", str(tiny_model)]),
                          ("scripts/run_bls_pipeline.py", []), ("scripts/run_ensemble_pipeline.py", [])):
        out = run(script, *common, *extra, "--output", str(tmp_path / "o.png"), cwd=tmp_path)
        for index in range(2):
            assert f"saved {tmp_path / f'o-{index}.png'} (80x48, 3 steps" in out
        outputs[script] = [np.asarray(Image.open(tmp_path / f"o-{index}.png")).astype(int) for index in range(2)]
    first, *others = outputs.values()
    assert np.abs(first[0] - first[1]).max() > 0  # two images of one prompt: two draws of the noise
    assert all(np.abs(a - b).max() <= 2 for other in others for a, b in zip(first, other))


def test_an_adapter_from_the_command_line_the_same_three_ways(triton_server, tiny_model, tmp_path):
    """--use-lora NAME: the request asks for a served adapter; each way gives the same image, and
    not the base weights' image."""
    common = ["--url", triton_server.grpc_url, "--num-inference-steps", "3", "--seed", "4", "--prompt", "a kite"]
    run("scripts/run_bls_pipeline.py", *common, "--output", str(tmp_path / "base.png"), cwd=tmp_path)
    for script, extra in (("scripts/run_client_side_pipeline.py", ["--model", str(tiny_model)]),
                          ("scripts/run_bls_pipeline.py", []), ("scripts/run_ensemble_pipeline.py", [])):
        run(script, *common, *extra, "--use-lora", "style", "--output", str(tmp_path / f"{Path(script).stem}.png"),
            cwd=tmp_path)
    base, client, bls, ensemble = (np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int) for name in (
        "base", "run_client_side_pipeline", "run_bls_pipeline", "run_ensemble_pipeline"))
    assert np.abs(client - bls).max() <= 2 and np.array_equal(bls, ensemble)
    assert np.abs(bls - base).max() > 10  # the adapter changed the image


@pytest.mark.parametrize("network", specs.NETWORKS)
def test_query_model(network, triton_server, tmp_path):
    out = run("scripts/query_model.py", network, "--url", triton_server.grpc_url, cwd=tmp_path)
    batch = specs.NETWORKS[network].profile.opt
    assert out.startswith(f"{network} (python), batch {batch}: ")
    for name in specs.NETWORKS[network].output_names:
        assert f"  {name}: float32 [{batch}, " in out


def test_query_model_beyond_the_profile_is_a_clear_error(triton_server, tmp_path):
    too_many = specs.UNET.profile.max + 1
    result = subprocess.run([sys.executable, str(ROOT / "scripts/query_model.py"), "unet", "--batch", str(too_many),
                             "--url", triton_server.grpc_url], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"batch-size must be <= {specs.UNET.profile.max} for 'unet'" in result.stderr
    assert "Traceback" not in result.stderr


def test_quickstart_main_job(tmp_path):
    """`make demo`: model, export, repository, server, both pipelines, images, times."""
    out = run("scripts/quickstart.py", "--num-inference-steps", "5", cwd=tmp_path)
    assert "max pixel difference between the two images: 0" in out
    assert "max pixel difference to the BLS image: 0" in out
    for image in ("outputs/client_side.png", "outputs/bls.png", "outputs/ensemble.png", "outputs/image_to_image.png",
                  "outputs/inpaint.png", "outputs/lora_style.png",  # the demo's LoRA adapter, a UNet of its own
                  "outputs/controlnet.png"):  # and its ControlNet, following the BLS image's edges
        assert f"  {image}\n" in out and (tmp_path / image).is_file()
    assert int(out.split("max pixel difference to the BLS image without it: ")[1].split()[0]) > 0
    times = out.split("Times:")[1]
    for number in ("1", "2", "3", "4", "5", "6", "7"):  # the walkthrough's steps it runs, by their table
        assert f"\n{heading(number)}" in times
    assert "\nstop Triton" in times
    assert (tmp_path / "models" / "tiny" / "model_index.json").is_file()
    graphs = sorted(p.name for p in (tmp_path / "onnx" / "tiny").iterdir())
    adapter = [name for name in graphs if name.startswith("unet_style-")]  # named by the adapter file's hash
    control = [f"{network.name}.onnx" for network in (specs.controlnet_model("edges"), specs.CONTROLLED_UNET)]
    assert len(adapter) == 1 and sorted(set(graphs) - set(adapter)) == sorted(
        [*(f"{name}.onnx" for name in specs.NETWORKS), *control])
    assert int(out.split("whose edges guided it: ")[1].split()[0]) > 0
    assert (tmp_path / "triton" / "models" / "unet_style" / "1" / "model.onnx").is_file()


def test_the_readmes_request_examples_run_as_written(triton_server):
    """The documents' Python, plain tritonclient and HTTP examples, against the session's server."""
    import contextlib
    import io
    import json
    import urllib.request

    from utils.docs.facts import HTTP_EXAMPLE, HTTP_EXAMPLE_URL, INPAINT_EXAMPLE, PLAIN_CLIENT_EXAMPLE, PYTHON_EXAMPLE

    for example in (PYTHON_EXAMPLE, PLAIN_CLIENT_EXAMPLE, INPAINT_EXAMPLE):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(example.replace("127.0.0.1:8001", triton_server.grpc_url), {})
        assert printed.getvalue().strip() == example.rsplit("# ", 1)[1]  # what its comment says it prints

    url = "http://" + HTTP_EXAMPLE_URL.replace("127.0.0.1:8000", triton_server.http_url.removeprefix("http://"))
    request = urllib.request.Request(url, data=json.dumps(HTTP_EXAMPLE).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        outputs = {output["name"]: output for output in json.loads(response.read())["outputs"]}
    output = outputs["images"]  # (and what was cut from a long prompt: nothing here)
    assert set(outputs["truncated_text"]["data"]) == {""}
    assert output["name"] == "images" and output["shape"] == [2, 64, 80, 3] and output["datatype"] == "UINT8"
    assert len(output["data"]) == 2 * 64 * 80 * 3


def test_the_admin_keys_the_launcher_makes_pass_as_script_arguments():
    """The launcher prints a fresh admin key that users give back to the scripts (--admin-key KEY):
    a key starting with "-" would read as an option there."""
    import argparse

    from utils.server.access import AccessPolicy

    parser = argparse.ArgumentParser()
    parser.add_argument("--admin-key")
    keys = [AccessPolicy().admin_key for _ in range(300)]  # an urlsafe token starts with "-" once in 64
    assert len(set(keys)) == len(keys)
    assert all(parser.parse_args(["--admin-key", key]).admin_key == key for key in keys)
