"""A fair benchmark of diffusers against the Triton pipelines: same work, figures that explain.

It measures contenders it is given (pipelines/contenders.py: diffusers and the three Triton ways).

Every contender generates the same images (same model, device, precision, scheduler, steps,
guidance, resolution, seed; diffusers with its safety checker off and PIL output, like the
Triton pipelines' uint8 images). The modules, in the order a run uses them:

- ``settings``: what is measured (Settings) and how the served pipelines are deployed;
- ``statistics``: Triton's per-model statistics, diffed around the measured runs;
- ``measure``: warm-up, measured runs, stage breakdown, concurrency, GPU scaling;
- ``fidelity``: each image against diffusers' for the same seed (PSNR);
- ``report``: the table, the chart, the JSON, the environment and the project's version.
"""

from utils.benchmark.fidelity import fidelity_problems
from utils.benchmark.measure import gpu_scaling, run_benchmark, run_concurrency
from utils.benchmark.report import chart, table, write_results
from utils.benchmark.settings import CONTROLNET, STAGES, TASKS, Settings

__all__ = ["CONTROLNET", "STAGES", "TASKS", "Settings", "chart", "fidelity_problems", "gpu_scaling", "run_benchmark",
           "run_concurrency", "table", "write_results"]
