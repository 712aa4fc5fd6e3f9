"""Step 7: query one network on Triton with tritonclient, on random inputs of its served shapes.

The smallest check that a model (ONNX Runtime, TensorRT or the portable backend) is served and
answers: it reads the model's config from the server, sends one batch, prints what came back.
"""

import argparse
import time

from tritonclient.utils import InferenceServerException

from pipelines.client import connect
from utils import specs
from utils.health import probe_inputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("network", choices=list(specs.NETWORKS))
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    parser.add_argument("--batch", type=int, default=None, help="default: the profile's optimal batch")
    args = parser.parse_args(argv)

    client = connect(args.url)
    config = client.get_model_config(args.network, as_json=True)["config"]
    batch = args.batch or specs.NETWORKS[args.network].profile.opt
    inputs = probe_inputs(config, batch)
    start = time.perf_counter()
    try:
        result = client.infer(args.network, inputs)
    except InferenceServerException as error:
        raise SystemExit(f"error: {error}")
    milliseconds = 1000 * (time.perf_counter() - start)
    backend = config.get("platform") or config.get("backend")
    print(f"{args.network} ({backend}), batch {batch}: {milliseconds:.1f} ms")
    for tensor in config["output"]:
        output = result.as_numpy(tensor["name"])
        print(f"  {tensor['name']}: {output.dtype} {list(output.shape)}, "
              f"range [{output.min():.3g}, {output.max():.3g}]")


if __name__ == "__main__":
    main()
