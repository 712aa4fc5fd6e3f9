"""Draw the Grafana dashboard's panels from real data: start Triton on a repository (default: the
walkthrough's, triton/models) and a local Prometheus that scrapes it, send requests through every
way for a while, then plot each panel's queries. Needs `make tools` (prometheus)."""

import argparse
import threading
import time
from pathlib import Path

from tqdm import tqdm

from pipelines.bls import BlsPipeline
from pipelines.ensemble import EnsemblePipeline
from utils.operations import dashboard
from utils.cli import add_generation_arguments, main_entry
from utils.layout import DEFAULT_REPOSITORY
from utils.operations.prometheus import RECORDING_RULES, LocalPrometheus
from utils.server import TritonServer


def traffic(url: str, stop: threading.Event, steps: int) -> None:
    bls, ensemble = BlsPipeline(url), EnsemblePipeline(url)
    while not stop.is_set():
        images = bls(["a red cube", "a blue sphere"], num_inference_steps=steps)
        ensemble("a lighthouse", num_inference_steps=steps)
        ensemble("a lighthouse at dusk", image=images[:1], num_inference_steps=steps, strength=0.6)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--seconds", type=float, default=90.0, help="how long to send requests")
    parser.add_argument("--clients", type=int, default=2, help="clients sending at once")
    add_generation_arguments(parser, ("num_inference_steps",), num_inference_steps=10)
    parser.add_argument("--output", type=Path, default=Path("outputs/dashboard.png"))
    args = parser.parse_args(argv)
    with TritonServer(args.repository) as server, \
            LocalPrometheus([server.metrics_url], rule_files=[RECORDING_RULES]) as prometheus:
        stop = threading.Event()
        clients = [threading.Thread(target=traffic, args=(server.grpc_url, stop, args.num_inference_steps)) for _ in range(args.clients)]
        start = time.time()
        for client in clients:
            client.start()
        for _ in tqdm(range(int(args.seconds)), desc="traffic", unit="s"):
            time.sleep(1)
        stop.set()
        for client in clients:
            client.join()
        time.sleep(3)  # the last scrapes
        args.output.parent.mkdir(parents=True, exist_ok=True)
        dashboard.plot(prometheus, start, time.time(), args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main_entry(main)
