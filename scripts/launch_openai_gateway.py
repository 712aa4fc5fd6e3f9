"""Serve OpenAI's images API in front of a running Triton server (pipelines/openai_gateway.py).

Any client of OpenAI's API then generates and edits images with the served pipelines: the openai
SDK with the address and the key printed at start as its base_url and api_key, curl, LiteLLM.
Binds 127.0.0.1 by default; the API key is required on every /v1 call.
"""

import os
import secrets

from utils.cli import image_sizes, main_entry, script_parser
from utils.gateway import API_KEY_ENV, DEFAULT_PORT
from utils.grpc_client import DEFAULT_URL, check_server, connect
from utils.models import model_slug, resolve_model


def main(argv=None):
    from pipelines.openai_gateway import create_app
    from pipelines.openai_images import Served
    from utils import specs

    parser = script_parser(__file__, __doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the Triton server's gRPC address (default {DEFAULT_URL})")
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on (default: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--model", default="tiny", help="the model the server serves (its sizes are read here)")
    parser.add_argument("--image-sizes", type=image_sizes, default=None, metavar="MIN-MAX",
                        help="the sizes the repository was written for, where not the default (--image-sizes)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id /v1/models lists and requests may name (default: the model's name)")
    args = parser.parse_args(argv)

    dims = specs.ModelDims.from_pretrained(resolve_model(args.model))
    sizes = specs.ImageSizes.default(dims)
    if args.image_sizes:
        sizes = specs.ImageSizes(*args.image_sizes, sizes.step)
    check_server(connect(args.url), args.url)  # within seconds, with the command that starts one
    api_key = os.environ.get(API_KEY_ENV)
    if not api_key:
        api_key = secrets.token_hex(24)
        print(f"API key: {api_key}  (send it as the header Authorization: Bearer KEY; set {API_KEY_ENV} to choose "
              f"one)", flush=True)
    served = Served(args.served_model_name or model_slug(args.model), sizes, (dims.image_height, dims.image_width))
    print(f"OpenAI images API for {served.model!r} on http://{args.host}:{args.port}/v1, Triton at {args.url}",
          flush=True)

    import uvicorn

    uvicorn.run(create_app(args.url, api_key, served), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main_entry(main)
