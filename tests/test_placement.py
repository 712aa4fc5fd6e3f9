"""Serving on several GPUs, checked on a CPU: the configs a GPU list produces, the repository
with a copy of each network per GPU, the --gpus argument, and how the launchers handle GPUs
this machine does not have. (The two-GPU run itself needs a machine with two GPUs.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from utils import specs
from utils.repository import configs, environments, gpus
from utils.benchmark import gpu_scaling
from utils.benchmark.statistics import per_network
from utils.deployment import GPU_PIPELINE_INSTANCES, PIPELINE_INSTANCES, Deployment, Placement
from utils.server.health import served_networks
from utils.layout import CONFIG_FILE, SERVING_FILE
from utils.repository.writer import write_repository
from utils.server import TritonServer, TritonServerError, server_environment, shared_libpython
from utils.server import docker as server_docker
from utils.server.install import COMPILE_CACHE

ROOT = Path(__file__).resolve().parents[1]
TWO_GPUS = Placement(gpus=(0, 1), pipeline_instances=3)
TORCH_CUDA = Deployment(runtime="torch", device="cuda")


def parsed(config: mc.ModelConfig) -> mc.ModelConfig:
    return configs.parse_pbtxt(configs.to_pbtxt(config))  # through Triton's schema, as the server reads it


@pytest.mark.parametrize("gpu", [0, 1])
def test_each_gpu_serves_its_own_copy_of_a_network(gpu):
    config = parsed(configs.network_config(specs.UNET, specs.ModelDims(16, 32, 4, 8, 8, 8), "FP16",
                                           replace(TORCH_CUDA, placement=TWO_GPUS), gpu=gpu))
    assert config.name == f"unet_gpu{gpu}"
    (group,) = config.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [gpu] and group.count == 1
    assert config.parameters["network"].string_value == "unet"  # what the runtime loads, whatever the name


def test_one_gpu_keeps_the_specs_names_and_pins_the_gpu():
    one = Placement(gpus=(0,))
    config = parsed(configs.network_config(specs.UNET, specs.ModelDims(16, 32, 4, 8, 8, 8), "FP16",
                                           replace(TORCH_CUDA, placement=one)))
    assert config.name == "unet" and list(config.instance_group[0].gpus) == [0]
    assert one.model_name("unet", 0) == "unet"


def test_pipeline_instances_are_placed_per_gpu():
    config = parsed(configs.pipeline_config(specs.TEXT_TO_IMAGE, TWO_GPUS))
    assert [(g.kind, list(g.gpus), g.count) for g in config.instance_group] == [
        (mc.ModelInstanceGroup.KIND_GPU, [0], 3), (mc.ModelInstanceGroup.KIND_GPU, [1], 3)]
    # The committed config is the CPU placement's.
    (cpu,) = parsed(configs.pipeline_config(specs.TEXT_TO_IMAGE)).instance_group
    assert cpu.kind == mc.ModelInstanceGroup.KIND_CPU and cpu.count == PIPELINE_INSTANCES


@pytest.mark.parametrize("gpus, message", [((0, 0), "distinct"), ((-1,), "distinct")])
def test_bad_gpu_lists_are_refused(gpus, message):
    with pytest.raises(ValueError, match=message):
        Placement(gpus=gpus)


def test_repository_on_two_gpus(tiny_model, tmp_path):
    repository = tmp_path / "repository"
    write_repository(repository, tiny_model, None, replace(TORCH_CUDA, placement=TWO_GPUS, torch_compile=("unet",)))
    models = sorted(path.name for path in repository.iterdir())
    # No ensembles: an ensemble names its models, and each network has two copies here.
    assert models == sorted([f"{name}_gpu{gpu}" for name in specs.NETWORKS for gpu in (0, 1)]
                            + [pipeline.name for pipeline in specs.BLS_PIPELINES])
    for gpu in (0, 1):
        config = configs.parse_pbtxt((repository / f"unet_gpu{gpu}" / CONFIG_FILE).read_text())
        assert list(config.instance_group[0].gpus) == [gpu]
        assert config.parameters["torch_compile"].string_value == "yes"
        assert (repository / f"unet_gpu{gpu}" / "1" / "checkpoint" / "unet").is_dir()
        text_encoder = configs.parse_pbtxt((repository / f"text_encoder_gpu{gpu}" / CONFIG_FILE).read_text())
        assert "torch_compile" not in text_encoder.parameters
    serving = json.loads((repository / specs.TEXT_TO_IMAGE.name / "1" / SERVING_FILE).read_text())
    assert serving == {"family": "sd", "refiner": False, "precision": "FP16", "device": "cuda", "gpus": [0, 1], "loop_device": "cpu",
                       "image_sizes": {"min": 48, "max": 96, "step": 8}}
    assert gpus.repository_gpus(repository)[specs.TEXT_TO_IMAGE.name] == {0, 1}
    assert gpus.repository_gpus(repository)["vae_decoder_gpu1"] == {1}


def test_cuda_defaults_to_gpu_0_with_the_gpu_pipeline_instances(tiny_model, tmp_path):
    write_repository(tmp_path, tiny_model, None, TORCH_CUDA)
    looping = [name for name, spec in specs.PIPELINES.items() if spec.networks]  # the BLS pipelines and denoise
    assert gpus.repository_gpus(tmp_path) == {name: {0} for name in [*specs.NETWORKS, *looping]}
    pipeline = configs.parse_pbtxt((tmp_path / specs.TEXT_TO_IMAGE.name / CONFIG_FILE).read_text())
    assert pipeline.instance_group[0].count == GPU_PIPELINE_INSTANCES


@pytest.mark.parametrize("options, message", [
    (dict(runtime="onnx", device="cpu", placement=TWO_GPUS), r"needs --backend python --runtime torch"),
    (dict(runtime="torch", device="cuda", torch_compile=("unett",)), r"torch_compile=\['unett'\]: name networks"),
    (dict(placement=Placement(pipeline_loop="with-unet")), r"--pipeline-loop with-unet .* add --runtime torch"),
    (dict(runtime="torch", device="cuda", placement=Placement(gpus=(0, 1), pipeline_loop="with-unet")),
     r"--gpus 0,1\): add --runtime torch, keep to one GPU"),
])
def test_placements_the_backend_cannot_serve_are_refused(options, message):
    with pytest.raises(ValueError, match=message):  # refused before a repository can be written
        Deployment(**options)


def test_pipeline_environment_is_an_archive_next_to_the_config(tiny_model, tmp_path):
    environment = tmp_path / "env"
    environments.create(environment)
    write_repository(tmp_path / "repository", tiny_model, None, replace(TORCH_CUDA, pipeline_environment=environment))
    pipeline = tmp_path / "repository" / specs.TEXT_TO_IMAGE.name
    config = configs.parse_pbtxt((pipeline / CONFIG_FILE).read_text())
    assert config.parameters[environments.CONFIG_KEY].string_value == environments.CONFIG_VALUE
    assert (pipeline / environments.ARCHIVE_NAME).is_file()
    # The same environment gives the same archive: writing again changes nothing.
    report = write_repository(tmp_path / "repository", tiny_model, None,
                              replace(TORCH_CUDA, pipeline_environment=environment))
    assert not report.written


def test_the_loop_with_the_unet_runs_in_one_instance_that_loads_the_served_unets_weights(tiny_model, tmp_path):
    placement = Placement.on_gpus(pipeline_loop="with-unet", pipeline_instances=6)
    write_repository(tmp_path, tiny_model, None, replace(TORCH_CUDA, placement=placement, torch_compile=("unet",)))
    for spec in (specs.TEXT_TO_IMAGE, specs.IMAGE_TO_IMAGE, specs.TEXT_TO_IMAGE_STREAM, specs.DENOISE):
        config = configs.parse_pbtxt((tmp_path / spec.name / CONFIG_FILE).read_text())
        assert [(g.kind, g.count, list(g.gpus)) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 1, [0])]
        serving = json.loads((tmp_path / spec.name / "1" / SERVING_FILE).read_text())
        assert serving["unet_in_process"] == {"model": "unet", "compile": True, "loops_in_flight": 6}
        assert serving["loop_device"] == "cuda"  # the loop's tensors where its UNet is
    for spec in (specs.TOKENIZER, specs.POSTPROCESS):  # no loop: kept off the GPU
        serving = json.loads((tmp_path / spec.name / "1" / SERVING_FILE).read_text())
        assert "unet_in_process" not in serving and serving["loop_device"] == "cpu"


def test_a_pipeline_environment_has_numpy_2s_names_for_c_long(tmp_path):
    """Libraries built for numpy 2 (scipy 1.18, which transformers' model code imports) use
    numpy.long; the numpy 1 of a pipeline environment gets it as numpy 1's C long."""
    environments.create(tmp_path / "env")
    probe = "import numpy; print(numpy.long is numpy.int_ or numpy.__version__ >= '2', numpy.ulong().dtype.itemsize)"
    result = subprocess.run([str(tmp_path / "env" / "bin" / "python3"), "-c", probe], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["True", "8"]


def test_gpu_argument():
    assert gpus.parse_gpus("0,1") == (0, 1) and gpus.parse_gpus("1") == (1,)
    assert gpus.parse_gpus("all", available=2) == (0, 1)
    with pytest.raises(gpus.GpuError, match=r"--gpus all: no NVIDIA GPU is visible here"):
        gpus.parse_gpus("all", available=0)
    with pytest.raises(gpus.GpuError, match=r"--gpus 'first': give GPU indices separated by commas"):
        gpus.parse_gpus("first")


def test_repository_placed_beyond_this_machines_gpus_is_refused_with_the_fix(tiny_model, tmp_path):
    write_repository(tmp_path, tiny_model, None, replace(TORCH_CUDA, placement=TWO_GPUS))
    gpus.check_repository_gpus(tmp_path, available=2)
    with pytest.raises(gpus.GpuError, match=r"places instances where this machine has none \(.*unet_gpu1 on GPU "
                                            r"\[1\].*\); it has 1 GPU \(0-0\).*--gpus all --force"):
        gpus.check_repository_gpus(tmp_path, available=1)
    # The local launcher says so before it starts a server (here: a server given no GPU).
    server = TritonServer(tmp_path, gpus=())
    with pytest.raises(TritonServerError, match=r"it has no GPU"):
        server.start()
    assert server.process is None


def test_launcher_refuses_more_gpus_than_it_is_given(tiny_model, tmp_path):
    write_repository(tmp_path / "repository", tiny_model, None, replace(TORCH_CUDA, placement=TWO_GPUS))
    result = subprocess.run([sys.executable, str(ROOT / "scripts/launch_triton_server.py"), "--gpus", "0",
                             "--repository", str(tmp_path / "repository")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unet_gpu1 on GPU [1]" in result.stderr and "it has 1 GPU" in result.stderr


def test_server_sees_only_the_gpus_it_is_given(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert server_environment(shared_libpython(), gpus=(1, 3))["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert "CUDA_VISIBLE_DEVICES" not in server_environment(shared_libpython())  # all of them


def test_compiled_kernels_are_kept_where_a_restart_finds_them(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert server_environment(shared_libpython())["TORCHINDUCTOR_CACHE_DIR"] == str(COMPILE_CACHE)
    assert COMPILE_CACHE.is_relative_to(Path.home() / ".cache") or "XDG_CACHE_HOME" in os.environ  # not /tmp
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the user's own choice wins
    assert server_environment(shared_libpython())["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)


def test_a_restart_after_torch_compiled_here_finds_the_same_cache(monkeypatch):
    """torch writes its default cache directory into this process's environment once torch._dynamo
    is imported (a benchmark that compiled diffusers before restarting the server): the server
    still gets the project's cache, where its first start left its kernels."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    first_start = server_environment(shared_libpython())["TORCHINDUCTOR_CACHE_DIR"]
    cache_dir()  # what importing torch._dynamo does
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] != first_start  # torch's own default, now in the environment
    assert server_environment(shared_libpython())["TORCHINDUCTOR_CACHE_DIR"] == first_start == str(COMPILE_CACHE)


def test_docker_gets_the_listed_devices(tmp_path):
    assert "--gpus=all" in server_docker.serve_command(tmp_path)
    # Quoted: docker reads the value as CSV, and an unquoted comma would split the device list.
    assert '--gpus="device=0,1"' in server_docker.serve_command(tmp_path, gpus=(0, 1))


def test_scaling_factor_per_concurrency():
    run = lambda images_per_s, errors=0: {"throughput_images_per_s": images_per_s, "errors": errors}  # noqa: E731
    scaling = gpu_scaling({"triton-bls": {"16": run(2.5)}}, {"triton-bls": {"16": run(4.6, errors=1)}}, gpus=2)
    assert scaling == {"triton-bls": {"16": {"images_per_s_1_gpu": 2.5, "images_per_s_2_gpus": 4.6, "gpus": 2,
                                             "factor": pytest.approx(1.84), "errors": 1}}}


def test_each_placed_gpu_gets_a_cuda_memory_pool(tiny_model, tmp_path):
    write_repository(tmp_path, tiny_model, None, replace(TORCH_CUDA, placement=TWO_GPUS))
    server = TritonServer(tmp_path, gpus=(0, 1))  # given two GPUs: the check passes without starting
    server.pool_gpus = server._check_gpus(tmp_path)
    command = server.command(Path("/server"))
    assert [arg for arg in command if arg.startswith("--cuda-memory-pool")] == [
        f"--cuda-memory-pool-byte-size=0:{server.cuda_pool_bytes}", f"--cuda-memory-pool-byte-size=1:{server.cuda_pool_bytes}"]


@pytest.mark.parametrize("arguments, message", [
    (["--gpus", "0"], r"--gpus 0 needs --runtime torch --device cuda \(got --runtime onnx --device cpu\)"),
    (["--runtime", "torch", "--device", "cuda", "--gpus", "0,x"], r"--gpus '0,x': give GPU indices"),
    (["--runtime", "torch", "--device", "cuda", "--gpus", "1,1"], r"gpus=\[1, 1\]: list distinct GPU indices"),
])
def test_scripts_explain_a_gpu_list_they_cannot_use(tmp_path, arguments, message):
    for script in ("scripts/move_onnx_models_to_triton.py", "scripts/benchmark_pipelines.py"):
        result = subprocess.run([sys.executable, str(ROOT / script), *arguments, "--repository", str(tmp_path / "r")],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "Traceback" not in result.stderr, (script, result.stderr)
        assert re.search(message, result.stderr), (script, result.stderr)
        assert not (tmp_path / "r").exists()  # refused before anything was written


def test_a_repository_on_two_gpus_gives_the_canary_and_the_statistics_its_names(tiny_model, tmp_path):
    write_repository(tmp_path, tiny_model, None, replace(TORCH_CUDA, placement=TWO_GPUS))
    names = served_networks(tmp_path)
    assert sorted(names) == sorted(f"{network}_gpu{gpu}" for network in specs.NETWORKS for gpu in (0, 1))
    assert set(names) <= {path.name for path in tmp_path.iterdir()}  # each one a model of the repository
    # Triton's statistics for the two copies, summed under the network's own name.
    stats = [{"name": f"unet_gpu{gpu}", "execution_count": 3 + gpu,
              "inference_stats": {"success": {"count": 6}, "compute_infer": {"ns": 1000 * (gpu + 1)}}}
             for gpu in (0, 1)] + [{"name": specs.TEXT_TO_IMAGE.name, "execution_count": 2}]
    figures = per_network(stats)
    assert set(figures) == {"unet", specs.TEXT_TO_IMAGE.name}
    assert figures["unet"]["executions"] == 7 and figures["unet"]["requests"] == 12
    assert figures["unet"]["compute_ns"] == 3000


def test_one_gpu_and_the_cpu_serve_the_specs_names(tiny_model, exports, repository, tmp_path):
    write_repository(tmp_path, tiny_model, None, TORCH_CUDA)
    assert served_networks(tmp_path) == list(specs.NETWORKS)
    assert served_networks(repository) == list(specs.NETWORKS)  # the CPU default's
