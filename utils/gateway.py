"""The OpenAI-compatible gateway's settings (pipelines/openai_gateway.py), where the launcher, the
documents and the tests read them."""

API_KEY_ENV = "SD_TRITON_API_KEY"  # the gateway's API key, where the launcher should not make one
DEFAULT_PORT = 8080
DEFAULT_SERVED_MODEL = "stable-diffusion"  # the model id /v1/models lists
# Where the serving image keeps the launcher (docker/triton/Dockerfile copies it there).
IMAGE_LAUNCHER = "/opt/sd-triton/scripts/launch_openai_gateway.py"
MAX_BODY_BYTES = 16 * 2**20  # a request's body: room for a 1024x1024 PNG image and its mask, in a form
