# Sourced by the GPU host scripts (benchmark.sh, rehearse_production.sh) on a GPU host whose Python
# has torch but no network: installs the wheels copied along in .whl/ (pack_wheels.py)
# and this project, and gives the pipeline model a Python environment of its own with numpy 1.
# Sets ENVIRONMENT: the --pipeline-environment arguments for the scripts (empty where not needed).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile $(ls .whl/*.whl | grep -v -e /numpy- -e /scipy-)
  # scipy (diffusers' LMS scheduler) where the host has none: its own stays.
  if ls .whl/scipy-*.whl >/dev/null 2>&1 && ! python3 -c "import scipy" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile .whl/scipy-*.whl
  fi
fi
# This project's packages, for the scripts and for the Triton stubs (which find packages
# through the python3 on PATH, not PYTHONPATH).
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>/dev/null \
  || echo "$PWD" > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/sd_triton_tutorial.pth"
# The 24.10 Python-backend stub is built against numpy 1 and mangles string inputs (the prompt)
# under numpy 2 (utils/repository/environments.py): the pipeline model gets numpy 1, the networks keep the
# host's environment.
ENVIRONMENT=()
if ls .whl/numpy-1*.whl >/dev/null 2>&1; then
  SITE=$(python3 -c "from utils.repository.environments import create; print(create('/tmp/pipeline-env'))")
  # with scipy built for numpy 1 and 2 alike (a host's own scipy may want numpy 2)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/numpy-1*.whl \
    $(ls .whl/scipy-*.whl 2>/dev/null)
  ENVIRONMENT=(--pipeline-environment /tmp/pipeline-env)
fi
