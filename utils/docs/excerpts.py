"""Excerpts of the project for the tutorial: source code, generated configs, commands and
figures, each produced from the project itself at ``make docs`` time."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Callable

from utils import specs
from utils.layout import PRODUCTION_REPOSITORY, PROJECT_ROOT
from utils.models import preset_dims

SD15 = preset_dims("sd15-random")


def source(path: str, name: str | None = None) -> str:
    """A top-level function, class or assignment of a source file (``Class.method`` for a method),
    or the whole file, as a Python block headed by where it comes from."""
    text = (PROJECT_ROOT / path).read_text()
    if name is None:
        return f"```python\n# {path}\n{text.rstrip()}\n```"
    node = _find(ast.parse(text), name.split("."))
    if node is None:
        raise KeyError(f"{path} has no {name}")
    start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    lines = text.splitlines()[start - 1:node.end_lineno]
    indent = len(lines[0]) - len(lines[0].lstrip())
    body = "\n".join(line[indent:] for line in lines)
    return f"```python\n# {path}\n{body}\n```"


def file(path: str) -> str:
    """A file of the project as it is (a config written by hand, a script), headed by its path."""
    language = {".pbtxt": "protobuf", ".py": "python", ".sh": "bash", ".yaml": "yaml"}.get(Path(path).suffix, "")
    comment = "#"
    return f"```{language}\n{comment} {path}\n{(PROJECT_ROOT / path).read_text().rstrip()}\n```"


def _find(tree: ast.AST, parts: list[str]):
    for node in getattr(tree, "body", []):
        names = [node.name] if hasattr(node, "name") else [
            target.id for target in getattr(node, "targets", []) if isinstance(target, ast.Name)]
        if parts[0] in names:
            return node if len(parts) == 1 else _find(node, parts[1:])
    return None


def config(model: str, backend: str = "", precision: str = "") -> str:
    """The config.pbtxt the repository step writes for a network with SD1.5's sizes (``backend``:
    python, onnxruntime or tensorrt; ``precision``: FP16 by default on the GPU backends), or the
    committed config of a Python model or ensemble."""
    from utils.repository import configs
    from utils.deployment import Deployment

    if model in specs.NETWORKS:
        backend = backend or "python"
        precision = precision or ("FP32" if backend == "python" else "FP16")
        built = configs.network_config(specs.NETWORKS[model], SD15, precision, Deployment(backend=backend))
    else:
        built = configs.committed_config(model)
    return "```protobuf\n" + configs.to_pbtxt(built).split("\n", 1)[1].rstrip() + "\n```"


def trtexec() -> str:
    """The four trtexec commands of step P4, for SD1.5's sizes."""
    from utils.repository.engines import trtexec_command

    commands = [" ".join(trtexec_command(network, SD15, PRODUCTION_REPOSITORY)) for network in specs.NETWORKS.values()]
    return "```\n" + "\n".join(f"$ {command}" for command in commands) + "\n```"


def budget(path: str) -> str:
    """The compute budget of a recorded benchmark: ideal time, measured time, overhead."""
    from utils.benchmark.report import budget_lines

    results = json.loads((PROJECT_ROOT / path).read_text())
    return "```\n" + "\n".join(budget_lines(results)) + "\n```"


def statistics(path: str, pipeline: str) -> str:
    """Where one pipeline's requests spent their time, per model, from Triton's statistics over
    a recorded benchmark's measured runs (milliseconds per request)."""
    results = json.loads((PROJECT_ROOT / path).read_text())
    per_request = results["pipelines"][pipeline]["stages"]["per_request_ms"]
    rows = [f"{'model':<24} {'queue':>8} {'compute input':>14} {'compute infer':>14} {'compute output':>15}"]
    for model, phases in per_request.items():
        rows.append(f"{model:<24} {phases['queue']:>8.3f} {phases['compute_input']:>14.3f} "
                    f"{phases['compute_infer']:>14.3f} {phases['compute_output']:>15.3f}")
    return "```\n" + "\n".join(rows) + "\n```"


def batching(path: str) -> str:
    """The UNet under load in a recorded benchmark: executions against requests (batching)."""
    results = json.loads((PROJECT_ROOT / path).read_text())
    rows = [f"{'pipeline':<20} {'clients':>7} {'images':>7} {'UNet executions':>16} {'rows per execution':>19} "
            f"{'ms per execution':>17} {'UNet busy':>10}"]
    for name, runs in results.get("concurrency", {}).items():
        for clients, run in runs.items():
            unet = run.get("unet")
            if unet:
                rows.append(f"{name:<20} {clients:>7} {run['requests']:>7} {unet['executions']:>16} "
                            f"{unet['mean_batch']:>19.1f} {unet['ms_per_execution']:>17.1f} {unet['busy_fraction']:>10.0%}")
    return "```\n" + "\n".join(rows) + "\n```"


def module_map(folder: str) -> str:
    """A package's modules, each with the first sentence of its docstring: the map of the code,
    written by the code."""
    rows = ["| module | what it is |", "| --- | --- |"]
    for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        paragraph = " ".join(docstring.split("\n\n")[0].split())
        sentence = paragraph.split(". ")[0].rstrip(".")
        if path.name == "__init__.py" and not sentence:
            continue
        name = str(path.relative_to(PROJECT_ROOT)).removesuffix("/__init__.py")
        rows.append(f"| `{name}` | {sentence.replace('|', '/')} |")
    return "\n".join(rows)


RENDERERS: dict[str, Callable[..., str]] = {
    "source": source, "file": file, "config": config, "trtexec": trtexec, "budget": budget, "statistics": statistics,
    "batching": batching, "module-map": module_map,
}
