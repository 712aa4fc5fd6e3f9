"""The tutorial's shared code as one installable package set: utils/ and pipelines/.

Installed into the environment that runs the Triton server too, because the Python-backend
models (the BLS pipeline, the portable ONNX Runtime components) import it.
"""

from setuptools import find_packages, setup

setup(
    name="sd-triton-tutorial",
    version="0.1.0",
    description="Stable Diffusion with ONNX, TensorRT and Triton Inference Server: a runnable tutorial",
    packages=find_packages(include=["utils", "utils.*", "pipelines", "pipelines.*"]),
    python_requires=">=3.10",
)
