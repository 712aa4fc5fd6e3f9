"""Serve OpenAI's images API in front of a running Triton server (pipelines/openai_gateway.py).

Any client of OpenAI's API then generates and edits images with the served pipelines: the openai
SDK with the address and the key printed at start as its base_url and api_key, curl, LiteLLM.
Binds 127.0.0.1 by default; the API key is required on every /v1 call. The image sizes it serves
are the repository's (read from it, as Triton serves it). With --docker, in the serving image.
"""

import os
import secrets
import subprocess
import time
from pathlib import Path

from utils.cli import main_entry, script_parser
from utils.gateway import API_KEY_ENV, DEFAULT_PORT, DEFAULT_SERVED_MODEL
from utils.grpc_client import DEFAULT_URL, ServerUnavailable, check_server, connect
from utils.layout import DEFAULT_REPOSITORY


def api_key_to_use() -> str:
    """The environment's key, or a fresh one, printed (as the server's launcher prints its admin key)."""
    api_key = os.environ.get(API_KEY_ENV)
    if not api_key:
        api_key = secrets.token_hex(24)
        print(f"API key: {api_key}  (send it as the header Authorization: Bearer KEY; set {API_KEY_ENV} to choose "
              f"one)", flush=True)
    return api_key


def wait_for_server(url: str, seconds: float) -> None:
    """Return once Triton answers at ``url``; past ``seconds``, fail with the command that starts one."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return check_server(connect(url), url)
        except ServerUnavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(2)


def main(argv=None):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the Triton server's gRPC address (default {DEFAULT_URL})")
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on (default: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--repository", default=DEFAULT_REPOSITORY, type=Path,
                        help=f"the model repository the server serves (default {DEFAULT_REPOSITORY}): its image sizes")
    parser.add_argument("--served-model-name", default=DEFAULT_SERVED_MODEL,
                        help=f"the model id /v1/models lists and requests may name (default {DEFAULT_SERVED_MODEL})")
    parser.add_argument("--wait-for-server", type=float, default=0, metavar="SECONDS",
                        help="wait this long for Triton to come up (a pod's server loads for minutes; default: check "
                             "once, and say so at once if none answers)")
    parser.add_argument("--docker", action="store_true",
                        help="run it in the serving image (`make images`), next to a server started with --docker")
    args = parser.parse_args(argv)

    if args.docker:
        from utils.server.docker import gateway_command

        command = gateway_command(args.repository, args.url, args.host, args.port, args.served_model_name)
        print("$", " ".join(command), flush=True)
        raise SystemExit(subprocess.call(command, env={**os.environ, API_KEY_ENV: api_key_to_use()}))

    from pipelines.openai_gateway import create_app, served_by

    served = served_by(args.repository, args.served_model_name)
    wait_for_server(args.url, args.wait_for_server)
    api_key = api_key_to_use()
    print(f"OpenAI images API for {served.model!r} on http://{args.host}:{args.port}/v1, Triton at {args.url}",
          flush=True)

    import uvicorn

    uvicorn.run(create_app(args.url, api_key, served), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main_entry(main)
