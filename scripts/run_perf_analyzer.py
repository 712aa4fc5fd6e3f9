"""Load-test a served network or the BLS pipeline with Triton's perf_analyzer.

A network gets random inputs of its served shapes, the pipeline one text-to-image request; each at
a range of concurrencies. Prints perf_analyzer's own summary (client and server side; for the
pipeline, the networks it called), then its figures parsed: throughput, latency percentiles, server
times per model. perf_analyzer is installed with `make tools`; it reads the server's statistics
API, so a server started by the launcher needs the admin key it printed (--admin-key).
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from utils import specs
from utils.operations import perf_analyzer
from utils.benchmark.report import environment
from utils.benchmark.statistics import inference_statistics
from utils.cli import add_generation_arguments, main_entry, script_parser
from utils.errors import UsageError
from utils.grpc_client import DEFAULT_URL, connect, served_config
from utils.layout import network_of
from utils.request import GenerationRequest, check_request
from utils.server.access import AccessPolicy
from utils.operations.tools import tool


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC address")
    parser.add_argument("--admin-key", default=None,
                        help="the key the launcher printed: perf_analyzer reads the statistics API, which needs it")
    parser.add_argument("model", nargs="?", default=specs.TEXT_TO_IMAGE.name,
                        help=f"a network ({', '.join(specs.NETWORKS)}, or its copy on a GPU, e.g. unet_gpu1) or "
                             f"the BLS pipeline ({', '.join(perf_analyzer.PIPELINES)}, the default)")
    parser.add_argument("--batch", type=int, default=None,
                        help="a network's rows per request (default: its profile's optimal batch)")
    parser.add_argument("--concurrency", default="1",
                        help="requests in flight, START[:END[:STEP]] as perf_analyzer takes it, e.g. 1:4")
    parser.add_argument("--measurement-interval", type=int, default=perf_analyzer.Load.measurement_interval_ms,
                        metavar="MS", help="each measurement window, in ms: windows repeat until three agree")
    parser.add_argument("--stability", type=int, default=perf_analyzer.Load.stability_percent, metavar="PERCENT",
                        help="how closely three windows must agree, in throughput and latency")
    parser.add_argument("--requests", type=int, default=0,
                        help="send exactly this many requests at one concurrency instead of measuring windows "
                             "(a smoke test: not checked for stability, and perf_analyzer divides by whole seconds)")
    parser.add_argument("--csv", type=Path, default=None, help="keep perf_analyzer's CSV report here")
    parser.add_argument("--record", type=Path, default=None,
                        help="write a JSON of the figures, the command, the machine and the versions here")
    # The pipeline's request: 50 steps by default, as the project's benchmark runs them.
    add_generation_arguments(parser, ("prompt", "num_inference_steps", "guidance_scale", "seed", "scheduler", "height",
                                      "width"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    load = perf_analyzer.Load(perf_analyzer.parse_concurrency(args.concurrency), args.measurement_interval,
                              args.stability, args.requests)
    pipeline = perf_analyzer.PIPELINES.get(args.model)
    if pipeline is None and network_of(args.model) not in specs.NETWORKS:
        raise UsageError(f"model {args.model!r} is neither a network nor a pipeline perf_analyzer can load: name "
                         f"one of {', '.join([*specs.NETWORKS, *perf_analyzer.PIPELINES])}.")
    if pipeline is not None and args.batch is not None:
        raise UsageError(f"--batch {args.batch} applies to a network: {args.model} takes one request at a time "
                         f"(raise --concurrency instead).")
    tool("perf_analyzer")  # not installed: say so before reaching for the server

    client = connect(args.url)
    config = served_config(client, args.url, args.model)
    headers = AccessPolicy(admin_key=args.admin_key).headers() if args.admin_key else None
    inference_statistics(client, args.url, headers, "perf_analyzer reads", args.model)  # before a run that needs it
    if pipeline is not None:
        perf_analyzer.check_composing_models(client, pipeline, args.url)
    client.close()

    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as work:
        work = Path(work)
        if pipeline is not None:
            request = check_request(
                GenerationRequest(prompt=[args.prompt], num_inference_steps=args.num_inference_steps,
                                  guidance_scale=args.guidance_scale, seed=args.seed, scheduler=args.scheduler,
                                  height=args.height, width=args.width),
                max_prompts=specs.MAX_PROMPTS, max_steps=None)
            perf_analyzer.write_input_data(work / "input_data.json", request, pipeline)
            arguments = perf_analyzer.pipeline_arguments(pipeline, Path("input_data.json"), args.url, load, headers)
        else:
            batch = args.batch if args.batch is not None else specs.NETWORKS[network_of(args.model)].profile.opt
            arguments = perf_analyzer.network_arguments(config, batch, args.url, load, headers)
        command = perf_analyzer.printable(["perf_analyzer", *arguments], headers)
        print("$", command, flush=True)
        report = work / "report.csv"
        results = perf_analyzer.measure(arguments, report, echo=lambda line: print(line, flush=True), cwd=work)
        if args.csv is not None:
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(report, args.csv)
    print(perf_analyzer.table(results))
    if args.csv is not None:
        print(f"\nperf_analyzer's CSV report: {args.csv}")
    if args.record is not None:
        given = sys.argv[1:] if argv is None else argv
        invocation = perf_analyzer.printable(["python", "scripts/run_perf_analyzer.py", *given], headers)
        perf_analyzer.write_record(args.record, invocation, command, results, environment(args.url))
        print(f"recorded: {args.record}")


if __name__ == "__main__":
    main_entry(main)
