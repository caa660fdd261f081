"""python -m mbkernels.serve: serve a patched MobileNet-style classifier over HTTP with Ray Serve.

    python -m mbkernels.serve --model mobilenetv3_large_100                 # a local single-node Ray cluster
    python -m mbkernels.serve --model tv:mobilenet_v3_large --checkpoint /data/model.pt \\
        --address HEAD_IP:6379 --replicas 8 --host 0.0.0.0                 # an existing cluster, 8 GPUs

Endpoints: POST /classify (one PNG or JPEG image as the body) -> {"top5": [...], "model": ..., "backend": ...};
GET /healthz (200 once every replica is ready, 503 before); GET /stats (this replica's batch sizes and latency).
Each replica holds the model in eval mode, patched with mbkernels, channels_last, and runs the requests that arrive
together as one batch; on a GPU there is one replica per GPU, in float16 by default, and every batch bucket (the
powers of two up to --max-batch-size) is replayed as a CUDA graph captured when the replica starts, after the patch's
choices were timed on that GPU at each bucket (or read from the tuning table: --tuning-table, tune once and ship
the file to every node).
"""
import argparse
import asyncio
import bisect
import collections
import dataclasses
import io
import os
import signal
import sys
import time
from typing import Optional

import torch
from PIL import Image, UnidentifiedImageError

from . import dispatch, patch
from .__main__ import OneLineErrors
from .models import DTYPES
from .models import build_model as build_stock_model
from .nn import DWConvBNAct, FusedModule, SqueezeExcite

APP_NAME = "mbkernels"
DEPLOYMENT_NAME = "Classifier"
IMAGE_FORMATS = ("PNG", "JPEG")
CONTENT_TYPES = ("image/png", "image/jpeg", "application/octet-stream")
DEFAULT_MAX_PIXELS = 4096 * 4096
TOP_K = 5
LATENCY_WINDOW = 10_000  # latencies each replica keeps for the percentiles of /stats
LATENCY_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000]


# ----------------------------------------------------------------------------------------- the model
def load_checkpoint(model: torch.nn.Module, name: str, path: str) -> None:
    """Load the state_dict saved at path into model; a file that is not one, or does not fit, raises ValueError."""
    readable = ("not a checkpoint this server reads: it reads a state_dict of tensors saved with "
                "torch.save(model.state_dict(), PATH)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise ValueError(f"--checkpoint {path}: cannot be read ({error.strerror or one_line(error)})") from None
    except Exception:  # not a file torch.save wrote, or one holding more than tensors (torch's advice is not ours)
        raise ValueError(f"--checkpoint {path}: {readable}") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"--checkpoint {path}: {readable}")
    expected = model.state_dict()
    problems = {
        "missing keys": [key for key in expected if key not in state],
        "unexpected keys": [key for key in state if key not in expected],
        "shape mismatches": [f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
                             for key, value in expected.items() if key in state and state[key].shape != value.shape],
    }
    found = [f"{len(items)} {kind} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
             for kind, items in problems.items() if items]
    if found:
        raise ValueError(f"--checkpoint {path} does not fit {name}: {'; '.join(found)}")
    model.load_state_dict(state)


def create_model(name: str, checkpoint: Optional[str] = None) -> torch.nn.Module:
    """The stock timm (or tv:NAME torchvision) model in eval mode: random weights, or checkpoint's state_dict. A
    model no library has, or a checkpoint that does not fit, raises ValueError."""
    model = build_stock_model(name)
    if checkpoint is not None:
        load_checkpoint(model, name, checkpoint)
    return model


def data_config(model: torch.nn.Module) -> dict:
    """timm's resolved data config of model: input size, interpolation, crop, mean and std (defaults for torchvision)."""
    import timm.data
    return timm.data.resolve_data_config({}, model=model)


def eval_transform(model: torch.nn.Module):
    """timm's eval preprocessing for model (resize, center crop, normalize): PIL RGB image -> float32 [3, H, W]."""
    import timm.data
    return timm.data.create_transform(**data_config(model))


def fused_backend(device: torch.device) -> str:
    """The backend the fused modules ask for where nothing was measured: the first that runs on device."""
    return dispatch.first_available(device)


def build_model(name: str, checkpoint: Optional[str] = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                tune_batches: Optional[list] = None):
    """(model, transform, backend): the model patched with mbkernels, on device in dtype and channels_last; its
    eval transform (PIL RGB image -> float32 [3, H, W]); the backends its fused modules run ("stock": none fused;
    "tuned: ..." the choices measured). tune_batches: the batch sizes the model will run (a GPU replica's buckets):
    each choice is timed on this device at each of them (or read from the tuning table,
    MBKERNELS_TUNING_CACHE) before the replica reports ready."""
    device = torch.device(device)
    model = create_model(name, checkpoint)
    transform = eval_transform(model)
    model = model.to(device, dtype, memory_format=torch.channels_last)
    if tune_batches:
        size = data_config(model)["input_size"]
        examples = [torch.randn(batch, *size, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
                    for batch in tune_batches]
        patch(model, example_inputs=examples)
        choices = {choice for m in model.modules() if isinstance(m, FusedModule) for choice in m.tuned.values()}
        backend = f"tuned: {', '.join(sorted(choices))}" if choices else "stock"
    else:
        backend = fused_backend(device)
        patch(model, backend=backend)
    if not any(isinstance(module, (DWConvBNAct, SqueezeExcite)) for module in model.modules()):
        backend = "stock"
    return model, transform, backend


def bucket_sizes(max_batch_size: int) -> list:
    """The batch sizes a batch is padded up to on a GPU: powers of two below max_batch_size, and max_batch_size."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return sizes + [max_batch_size]


class BatchClassifier:
    """Class probabilities for a batch of preprocessed images. On a GPU each batch is padded up to its bucket and the
    bucket's CUDA graph (captured here, once per bucket) replayed: no per-layer launch overhead at small batches."""

    def __init__(self, model: torch.nn.Module, input_size, max_batch_size: int):
        parameter = next(model.parameters())
        self.model, self.device, self.dtype = model, parameter.device, parameter.dtype
        self.buckets = bucket_sizes(max_batch_size)
        self.graphs = {size: self._capture(size, input_size) for size in self.buckets} if self.on_gpu else {}

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def _capture(self, size: int, input_size):
        static_input = torch.zeros((size, *input_size), device=self.device, dtype=self.dtype)
        static_input = static_input.contiguous(memory_format=torch.channels_last)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(3):  # lazy initialisation and cuDNN's algorithm choice happen here, not in the graph
                self.model(static_input)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            static_output = self.model(static_input)
        return graph, static_input, static_output

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images: float32 [N, 3, H, W], N <= max batch size -> float32 [N, classes] probabilities on the CPU."""
        count = len(images)
        with torch.inference_mode():
            if self.on_gpu:
                graph, static_input, static_output = self.graphs[self.buckets[bisect.bisect_left(self.buckets, count)]]
                # Rows are independent in eval mode: the padding rows left from an earlier batch change nothing here.
                static_input[:count].copy_(images)
                graph.replay()
                logits = static_output[:count]
            else:
                logits = self.model(images.to(self.dtype).contiguous(memory_format=torch.channels_last))
            return logits.float().softmax(-1).cpu()


def top_classes(probabilities: torch.Tensor, k: int = TOP_K) -> list:
    """[{"index": i, "probability": p}, ...], the k most probable classes of one image, most probable first."""
    values, indices = probabilities.topk(min(k, probabilities.shape[-1]))
    return [{"index": int(index), "probability": float(value)} for value, index in zip(values, indices)]


# ----------------------------------------------------------------------------------------- the input
class BadInput(ValueError):
    """A request the server refuses with 400; kind tags the rejected-requests metric."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def check_content_type(content_type: Optional[str]) -> None:
    media_type = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if media_type not in CONTENT_TYPES:
        raise BadInput("content_type", f"unsupported Content-Type {media_type!r}: send the image bytes as the body "
                                       f"with one of {', '.join(CONTENT_TYPES)}")


def decode_image(body: bytes, max_pixels: int) -> Image.Image:
    """The RGB image in body (PNG or JPEG), its size checked against max_pixels from the header before decoding."""
    if not body:
        raise BadInput("empty", "empty body: send one PNG or JPEG image")
    too_large = f"over the limit of {max_pixels} pixels"
    try:
        image = Image.open(io.BytesIO(body), formats=IMAGE_FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise BadInput("not_image", "the body is not a PNG or JPEG image") from None
    except Image.DecompressionBombError:
        raise BadInput("too_large", f"the image is {too_large}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadInput("too_large", f"the image is {width}x{height} = {width * height} pixels, {too_large}")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for cut-off or corrupt image data
        raise BadInput("truncated", f"the {image.format} image is truncated or corrupt: {one_line(error)}") from None
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------- the service
@dataclasses.dataclass(frozen=True)
class ServeOptions:
    model: str
    checkpoint: Optional[str] = None
    replicas: int = 1
    device: str = "cpu"  # cuda or cpu, resolved from the cluster's resources by the command
    dtype: str = "float32"
    max_batch_size: int = 32
    batch_wait_ms: float = 5.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    host: str = "127.0.0.1"
    port: int = 8000
    tune: bool = True  # GPU replicas time their choices at their batch buckets before they report ready
    tuning_table: Optional[str] = None  # the table replicas read and write (MBKERNELS_TUNING_CACHE)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def percentile(sorted_values: list, fraction: float) -> Optional[float]:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))]


class ReplicaStats:
    """What /stats reports for one replica: the batch sizes formed, the requests answered and their latency."""

    def __init__(self):
        self.batch_sizes = collections.Counter()
        self.requests = 0
        self.rejected = 0
        self.latencies_ms = collections.deque(maxlen=LATENCY_WINDOW)

    def as_json(self, replica: str) -> dict:
        latencies = sorted(self.latencies_ms)
        return {
            "replica": replica,
            "requests": self.requests,
            "rejected": self.rejected,
            "batches": sum(self.batch_sizes.values()),
            "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())},
            "latency_ms": {"p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
                           "window": len(latencies)},
        }


def json_response(body: dict, status: int = 200, headers: Optional[dict] = None):
    from starlette.responses import JSONResponse
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(status: int, reason: str, headers: Optional[dict] = None):
    return json_response({"error": reason}, status, headers)


def classifier_deployment():
    """The Serve deployment class (made on demand: importing mbkernels.serve needs no ray)."""
    from ray import serve
    from ray.serve.metrics import Counter, Histogram

    class Classifier:
        def __init__(self, options: ServeOptions):
            self.options = options
            Image.MAX_IMAGE_PIXELS = options.max_pixels  # PIL's own decompression-bomb guard, at the same limit
            # A GPU replica times its choices at its batch buckets (or reads them from the tuning table).
            buckets = bucket_sizes(options.max_batch_size) if options.device == "cuda" and options.tune else None
            model, self.transform, self.backend = build_model(
                options.model, options.checkpoint, options.device, DTYPES[options.dtype], buckets)
            self.run_batch = BatchClassifier(model, data_config(model)["input_size"], options.max_batch_size)
            self.classify_batch.set_max_batch_size(options.max_batch_size)
            self.classify_batch.set_batch_wait_timeout_s(options.batch_wait_ms / 1e3)
            self.failure = None  # set by a CUDA error: check_health then fails and Serve replaces this replica
            self.stats = ReplicaStats()
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.batch_size_metric = Histogram(
                "mbkernels_batch_size", "Batch sizes formed by serve.batch and run as one forward",
                boundaries=[float(size) for size in self.run_batch.buckets])
            self.latency_metric = Histogram(
                "mbkernels_request_latency_ms", "Latency of POST /classify in the replica: decode, batch, forward",
                boundaries=LATENCY_BUCKETS_MS)
            self.rejected_metric = Counter(
                "mbkernels_rejected_requests", "Requests refused with 400, by reason", tag_keys=("reason",))
            self.routes = {"/classify": ("POST", self.handle_classify), "/healthz": ("GET", self.handle_healthz),
                           "/stats": ("GET", self.handle_stats)}

        def check_health(self) -> None:
            if self.failure is not None:
                raise RuntimeError(f"a forward failed on the GPU: {self.failure}")

        async def __call__(self, request):
            path = request.url.path.rstrip("/") or "/"
            if path not in self.routes:
                routes = ", ".join(f"{method} {route}" for route, (method, _) in self.routes.items())
                return error_response(404, f"no route {request.method} {path}; routes: {routes}")
            method, handle = self.routes[path]
            if request.method != method:
                return error_response(405, f"{path} answers {method}, not {request.method}", {"Allow": method})
            return await handle(request)

        async def handle_classify(self, request):
            started = time.perf_counter()
            try:
                check_content_type(request.headers.get("content-type"))
                image = await asyncio.to_thread(self.preprocess, await request.body())
            except BadInput as error:
                self.stats.rejected += 1
                self.rejected_metric.inc(tags={"reason": error.kind})
                return error_response(400, str(error))
            top5 = await self.classify_batch(image)
            latency_ms = (time.perf_counter() - started) * 1e3
            self.stats.requests += 1
            self.stats.latencies_ms.append(latency_ms)
            self.latency_metric.observe(latency_ms)
            return json_response({"top5": top5, "model": self.options.model, "backend": self.backend})

        def preprocess(self, body: bytes) -> torch.Tensor:
            return self.transform(decode_image(body, self.options.max_pixels))

        @serve.batch  # sizes set per replica from the options, in __init__
        async def classify_batch(self, images: list) -> list:
            self.stats.batch_sizes[len(images)] += 1
            self.batch_size_metric.observe(len(images))
            try:
                probabilities = await asyncio.to_thread(self.run_batch, torch.stack(images))
            except RuntimeError as error:
                if self.run_batch.on_gpu:  # a CUDA error can leave the context unusable: have Serve replace us
                    self.failure = one_line(error)
                raise
            return [top_classes(row) for row in probabilities]

        async def handle_healthz(self, request):
            status = await asyncio.to_thread(serve.status)
            deployment = status.applications[APP_NAME].deployments[DEPLOYMENT_NAME]
            running = deployment.replica_states.get("RUNNING", 0)
            ready = deployment.status == "HEALTHY" and running >= self.options.replicas
            return json_response({"ready": ready, "replicas_running": running, "replicas": self.options.replicas,
                                  "status": str(deployment.status.value)}, 200 if ready else 503)

        async def handle_stats(self, request):
            return json_response(self.stats.as_json(self.replica))

    return Classifier


def replica_actor_options(options: ServeOptions) -> dict:
    """What each replica's Ray actor gets: a GPU or a CPU, and the tuning table to read (on whichever node)."""
    resources = {"num_cpus": 1, "num_gpus": 1} if options.device == "cuda" else {"num_cpus": 1}
    if options.tuning_table:
        resources["runtime_env"] = {"env_vars": {"MBKERNELS_TUNING_CACHE": options.tuning_table}}
    return resources


def classifier_app(options: ServeOptions):
    from ray import serve
    deployment = serve.deployment(
        classifier_deployment(), name=DEPLOYMENT_NAME, num_replicas=options.replicas,
        ray_actor_options=replica_actor_options(options),
        # One batch forms while the one before runs.
        max_ongoing_requests=2 * options.max_batch_size,
        health_check_period_s=5, health_check_timeout_s=30)
    return deployment.bind(options)


def run_application(options: ServeOptions) -> None:
    """Start Serve's HTTP proxy on options' host and port, deploy the classifier and wait until every replica runs
    (Ray must be initialised)."""
    from ray import serve
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(classifier_app(options), name=APP_NAME, route_prefix="/")


# ----------------------------------------------------------------------------------------- a client
def http_request(url: str, method: str = "GET", body: Optional[bytes] = None, content_type: Optional[str] = None,
                 timeout: float = 30.0) -> tuple:
    """(status, payload) of one HTTP request: payload is the decoded JSON, or the text when the body is not JSON."""
    import json
    import urllib.error
    import urllib.request
    # urllib would label a body application/x-www-form-urlencoded: say what it is, or send none.
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, data = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, data = error.code, error.read()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode(errors="replace")


def classify(url: str, image: bytes, content_type: str = "application/octet-stream", attempts: int = 20,
             timeout: float = 30.0, backoff_s: float = 0.25) -> tuple:
    """(status, payload, attempts used) of POST url/classify, retried while the server refuses or fails it (5xx,
    connection refused or dropped, as while a replica is replaced): at most `attempts` tries, backing off."""
    for attempt in range(1, attempts + 1):
        try:
            status, payload = http_request(f"{url}/classify", "POST", image, content_type, timeout)
        except OSError as error:  # refused, reset or timed out: the request was not answered
            status, payload = None, one_line(error)
        if status is not None and status < 500:
            return status, payload, attempt
        time.sleep(min(backoff_s * attempt, 2.0))
    return status, payload, attempts


# ----------------------------------------------------------------------------------------- the command
def make_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="python -m mbkernels.serve", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="timm model name, or tv:NAME for torchvision")
    parser.add_argument("--checkpoint", help="state_dict saved with torch.save(model.state_dict(), PATH), readable "
                                             "at PATH on every node (default: random weights)")
    parser.add_argument("--replicas", type=int, help="replicas (default: one per GPU in the cluster, 1 on the CPU)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; "
                                                             "0.0.0.0 to be reached from other machines)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda when the cluster has GPUs (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: float16 on a GPU, float32 on the CPU")
    parser.add_argument("--max-batch-size", type=int, default=32, help="largest batch one forward runs "
                                                                      "(default: %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a replica waits for a batch to fill (default: %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="largest image accepted, width x height (default: %(default)s)")
    parser.add_argument("--no-tune", action="store_true",
                        help="GPU replicas do not time their choices at their batch buckets (default: they do, "
                             "before they report ready)")
    parser.add_argument("--tuning-table", help="the tuning table every replica reads and adds to: tune once on one "
                                               "GPU, ship the file to each node (default: MBKERNELS_TUNING_CACHE, "
                                               "else each node's own)")
    parser.add_argument("--address", help="Ray cluster to join, e.g. HEAD_IP:6379 (default: start a local one)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all; not with --address)")
    return parser


def checked_args(parser: argparse.ArgumentParser, argv: Optional[list]) -> argparse.Namespace:
    """The parsed options, each bad value refused in one line with exit status 2 before any cluster starts."""
    args = parser.parse_args(argv)
    for name in ("replicas", "max_batch_size", "max_pixels", "num_cpus"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_wait_ms < 0:
        parser.error("--batch-wait-ms must be at least 0")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be from 1 to 65535, got {args.port}")
    if args.address and args.num_cpus:
        parser.error("--num-cpus sizes a local cluster; with --address the cluster has its own")
    return args


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    return checked_args(make_parser(), argv)


def resolve_options(args: argparse.Namespace, cluster_gpus: float) -> ServeOptions:
    device = args.device if args.device != "auto" else ("cuda" if cluster_gpus >= 1 else "cpu")
    if device == "cuda" and cluster_gpus < 1:
        raise SystemExit("--device cuda: the Ray cluster has no GPU")
    replicas = args.replicas or (int(cluster_gpus) if device == "cuda" else 1)
    if device == "cuda" and replicas > cluster_gpus:
        raise SystemExit(f"--replicas {replicas}: the Ray cluster has {int(cluster_gpus)} GPU(s), one per replica")
    dtype = args.dtype or ("float16" if device == "cuda" else "float32")
    table = args.tuning_table or os.environ.get("MBKERNELS_TUNING_CACHE")
    return ServeOptions(args.model, args.checkpoint, replicas, device, dtype, args.max_batch_size,
                        args.batch_wait_ms, args.max_pixels, args.host, args.port, not args.no_tune,
                        os.path.abspath(table) if table else None)


def main(argv: Optional[list] = None) -> int:
    parser = make_parser()
    args = checked_args(parser, argv)
    try:  # here, before any replica starts: an unknown model or a checkpoint that does not fit is one clear line
        create_model(args.model, args.checkpoint)
    except ValueError as error:
        parser.error(str(error))
    import ray
    from ray import serve

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
    # Both end the wait below the same way, so both shut down the same way (ray.init set SIGTERM to exit at once; a
    # process started in the background by a shell without job control inherits SIGINT ignored).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    try:
        options = resolve_options(args, ray.cluster_resources().get("GPU", 0))
        run_application(options)
        print(f"mbkernels.serve: {options.model} on {options.replicas} {options.device} replica(s), "
              f"{options.dtype}; listening on {options.url} (POST /classify, GET /healthz, GET /stats)", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # let the shutdown finish: no process left behind
            signal.signal(signum, signal.SIG_IGN)
        print("mbkernels.serve: shutting down", file=sys.stderr, flush=True)
        if args.address:
            serve.delete(APP_NAME)  # the cluster is someone else's: leave the rest of Serve running
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
