"""Tools the operations steps and their tests run that pip does not install: Triton's
``perf_analyzer``, Prometheus with ``promtool``, and mermaid's ``mmdc`` (the documentation's
diagrams, tests/mermaid_cli.py). ``make tools`` (``python scripts/install_tools.py``) puts them under
``.tools/``, without root except for chromium:

- ``perf_analyzer`` comes in the ``tritonclient`` wheel of the server's own release (2.51.0; PyPI's
  ``perf-analyzer`` package is an empty placeholder). It needs ``libb64`` (Debian's ``libb64-0d``)
  and ``libcudart.so.12`` (the ``nvidia-cuda-runtime-cu12`` wheel of requirements.txt), even
  against a CPU-only server.
- ``prometheus`` and ``promtool``: Debian's ``prometheus`` package.
- ``mmdc``: ``@mermaid-js/mermaid-cli`` from npm (Node.js 18.19 or newer), in ``.tools/node``, installed
  with ``npm ci`` from the lock file in ``utils/operations/mermaid_cli/``: every package of its tree is
  pinned, so a release published upstream since cannot change or break the install. It runs mermaid, the library GitHub draws ```mermaid blocks
  with, in a real browser: a diagram it cannot render shows as an error on GitHub too. Puppeteer's
  browser download is skipped (CI and the tutorial's machines reach only the package registries):
  it drives Debian's ``chromium``, installed with apt-get when we are root, or asked for
  (``sudo apt-get install chromium``). ``.tools/bin/mmdc`` passes the puppeteer config that starts
  chromium headless on a closed network: no sandbox (chromium refuses one as root), no background networking
  (it stalls waiting for the network).

The Debian packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``
(Debian 12, Ubuntu 22.04 or newer; the server's own requirement).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from utils.docker import TRITON_VERSION
from utils.errors import UserError
from utils.layout import PROJECT_ROOT

TOOLS_DIR = PROJECT_ROOT / ".tools"
TRITONCLIENT_RELEASE = TRITON_VERSION  # perf_analyzer of the server's own release (nvidia-pytriton's tritonserver)
DEBIAN_PACKAGES = {"prometheus": "2.42.0+ds-5+deb12u1", "libb64-0d": "1.2-5+b1"}
INSTALL_COMMAND = "make tools"
# package.json pins mermaid-cli 11.17.0, the last for Node 20 (12.x needs Node 22.13), with its peer
# puppeteer at 24.x (25.x needs Node 22 too); package-lock.json pins the rest of the tree.
MERMAID_CLI_PACKAGE = Path(__file__).with_name("mermaid_cli")
MERMAID_CLI = json.loads((MERMAID_CLI_PACKAGE / "package.json").read_text())["dependencies"]
NODE_MINIMUM = (18, 19)  # mermaid-cli 11's engines
CHROMIUM = Path("/usr/bin/chromium")  # Debian's launcher script; CHROMIUM_BINARY is what it starts
CHROMIUM_BINARY = Path("/usr/lib/chromium/chromium")
# Without these chromium waits on the closed network (component updates, sync, first-run pages);
# --no-sandbox because the sandbox refuses root; /dev/shm is 64 MB in containers.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--no-first-run", "--no-default-browser-check"]


class ToolMissing(UserError, FileNotFoundError):
    """A tool is not installed: the message says how to install it."""


def tool(name: str) -> Path:
    """The path of an installed tool: perf_analyzer, prometheus, promtool or mmdc."""
    path = TOOLS_DIR / "bin" / name
    if not path.exists():
        needs = ("npm, and Debian's chromium (apt-get as root, or `sudo apt-get install chromium` first)"
                 if name == "mmdc" else "apt-get and pip, no root")
        raise ToolMissing(f"{name} is not installed in {TOOLS_DIR}: run `{INSTALL_COMMAND}` (it needs {needs}).")
    return path


def environment() -> dict[str, str]:
    """The environment a tool runs in: the libraries it needs on LD_LIBRARY_PATH."""
    import nvidia.cuda_runtime

    libraries = [TOOLS_DIR / "lib", Path(nvidia.cuda_runtime.__path__[0]) / "lib"]
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
        [*map(str, libraries), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])}


def install(destination: Path = TOOLS_DIR) -> None:
    (destination / "bin").mkdir(parents=True, exist_ok=True)
    (destination / "lib").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        _install_perf_analyzer(destination, work)
        _install_debian_packages(destination, work)
    _install_mermaid_cli(destination)
    for name in ("perf_analyzer", "prometheus", "promtool", "mmdc"):
        print(f"{destination / 'bin' / name}")


def _install_perf_analyzer(destination: Path, work: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    f"tritonclient=={TRITONCLIENT_RELEASE}", "-d", str(work)], check=True)
    (wheel,) = work.glob("tritonclient-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        member = f"tritonclient-{TRITONCLIENT_RELEASE}.data/data/bin/perf_analyzer"
        target = destination / "bin" / "perf_analyzer"
        target.write_bytes(archive.read(member))
        target.chmod(0o755)


def _install_debian_packages(destination: Path, work: Path) -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise ToolMissing("apt-get and dpkg-deb are needed to fetch Debian's prometheus and libb64-0d "
                          "(Debian 12 or Ubuntu 22.04 and newer).")
    pinned = [f"{name}={version}" for name, version in DEBIAN_PACKAGES.items()]
    done = subprocess.run(["apt-get", "download", *pinned], cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        raise ToolMissing(f"apt-get download {' '.join(pinned)} failed: {done.stderr.strip()[-500:]} "
                          f"(run `apt-get update` first if the package lists are missing).")
    unpacked = work / "unpacked"
    for package in work.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(package), str(unpacked)], check=True)
    for name in ("prometheus", "promtool"):
        shutil.copy2(unpacked / "usr" / "bin" / name, destination / "bin" / name)
    for library in (unpacked / "usr" / "lib" / "x86_64-linux-gnu").glob("libb64.so*"):
        shutil.copy2(library, destination / "lib" / library.name, follow_symlinks=True)


def _install_mermaid_cli(destination: Path) -> None:
    _check_node()
    prefix = destination / "node"
    prefix.mkdir(exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copy2(MERMAID_CLI_PACKAGE / name, prefix / name)
    # --ignore-scripts: puppeteer's postinstall would download a Chrome; the variables cover
    # an npm that runs it anyway.
    environment = {**os.environ, "PUPPETEER_SKIP_DOWNLOAD": "1", "PUPPETEER_SKIP_CHROMIUM_DOWNLOAD": "1"}
    done = subprocess.run(["npm", "ci", "--prefix", str(prefix), "--ignore-scripts", "--no-audit", "--no-fund"],
                          env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        pinned = " ".join(f"{name}@{version}" for name, version in MERMAID_CLI.items())
        raise ToolMissing(f"npm ci of {pinned} (lock file {MERMAID_CLI_PACKAGE / 'package-lock.json'}) failed: "
                          f"{done.stderr.strip()[-800:]} (mmdc needs the npm registry, or npm's proxy settings).")
    config = prefix / "puppeteer-config.json"
    config.write_text(json.dumps({"executablePath": str(_chromium()), "headless": True, "args": CHROMIUM_ARGS},
                                 indent=2) + "\n")
    # A wrapper rather than a link: whoever runs mmdc gets the config without knowing of it.
    wrapper = destination / "bin" / "mmdc"
    wrapper.write_text(f"""#!/bin/sh
# @mermaid-js/mermaid-cli {MERMAID_CLI['@mermaid-js/mermaid-cli']} driving Debian's chromium (utils/operations/tools.py).
here=$(dirname "$(readlink -f "$0")")
exec "$here/../node/node_modules/.bin/mmdc" --puppeteerConfigFile "$here/../node/puppeteer-config.json" "$@"
""")
    wrapper.chmod(0o755)


def _check_node() -> None:
    fix = "install Node.js 18.19 or newer with npm (Debian: `sudo apt-get install nodejs npm`)"
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise ToolMissing(f"npm is needed to install mmdc (@mermaid-js/mermaid-cli): {fix}.")
    version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    found = re.match(r"v(\d+)\.(\d+)", version)
    if found is None or tuple(map(int, found.groups())) < NODE_MINIMUM:
        raise ToolMissing(f"node {version or '(no version)'} is too old for mmdc "
                          f"(@mermaid-js/mermaid-cli {MERMAID_CLI['@mermaid-js/mermaid-cli']}): {fix}.")


def _chromium() -> Path:
    """Debian's chromium, installed with apt-get when it is missing and we are root."""
    if not CHROMIUM.exists():
        if os.geteuid() != 0:
            raise ToolMissing(f"chromium is not installed ({CHROMIUM}; mmdc renders the diagrams in it): run "
                              f"`sudo apt-get install chromium`, then `{INSTALL_COMMAND}`.")
        if shutil.which("apt-get") is None:
            raise ToolMissing(f"chromium is not installed ({CHROMIUM}) and apt-get is missing: install Debian's "
                              f"chromium (Debian 12 or newer), then run `{INSTALL_COMMAND}`.")
        done = _apt_install_chromium()
        if done.returncode != 0 and re.search(r"Unable to locate package|has no installation candidate", done.stderr):
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            done = _apt_install_chromium()
        if done.returncode != 0 or not CHROMIUM.exists():
            raise ToolMissing(f"apt-get install chromium failed: {done.stderr.strip()[-500:]} (mmdc needs Debian's "
                              f"chromium at {CHROMIUM}).")
    # The launcher script adds extensions and a /dev/shm check that fails noisily in containers;
    # puppeteer passes all the flags itself.
    return CHROMIUM_BINARY if CHROMIUM_BINARY.exists() else CHROMIUM


def _apt_install_chromium() -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True,
                          text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})

