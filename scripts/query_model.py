"""Query one network on Triton with tritonclient, on random inputs of its served shapes.

The smallest check that a model (ONNX Runtime, TensorRT or the portable backend) is served and
answers: it reads the model's config from the server, sends one batch, prints what came back.
A network served once per GPU is named by its copy: unet_gpu0, unet_gpu1, ...
"""

import time

from tritonclient.utils import InferenceServerException

from utils import specs
from utils.cli import main_entry, script_parser
from utils.errors import UsageError
from utils.grpc_client import DEFAULT_URL, connect, served_config
from utils.server.health import probe_inputs
from utils.layout import network_of


def main(argv=None):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("model", help=f"a served network: {', '.join(specs.NETWORKS)} (or its copy on a GPU, "
                                      f"e.g. unet_gpu1)")
    parser.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC address")
    parser.add_argument("--batch", type=int, default=None, help="default: the profile's optimal batch")
    args = parser.parse_args(argv)
    network = specs.NETWORKS.get(network_of(args.model))
    if network is None:
        raise UsageError(f"{args.model!r} is not a network: name one of {', '.join(specs.NETWORKS)}, or its copy on "
                         f"a GPU (e.g. unet_gpu1).")

    client = connect(args.url)
    config = served_config(client, args.url, args.model)
    batch = args.batch or network.profile.opt
    inputs = probe_inputs(config, batch)
    start = time.perf_counter()
    try:
        result = client.infer(args.model, inputs)
    except InferenceServerException as error:
        raise UsageError(f"{args.model}, batch {batch}: {error.message()}") from None
    milliseconds = 1000 * (time.perf_counter() - start)
    backend = config.get("platform") or config.get("backend")
    print(f"{args.model} ({backend}), batch {batch}: {milliseconds:.1f} ms")
    for tensor in config["output"]:
        output = result.as_numpy(tensor["name"])
        print(f"  {tensor['name']}: {output.dtype} {list(output.shape)}, "
              f"range [{output.min():.3g}, {output.max():.3g}]")


if __name__ == "__main__":
    main_entry(main)
