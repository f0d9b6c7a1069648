"""Drawing-app latency: from the end of a stroke to the new face, over real HTTP on this machine.

For each model it starts `dfd-model serve`'s server in this process, posts the request the
page sends after a stroke (the 512x512 sketch PNG as a data URL, refinement, shadow on), and
times the full round trip (encode, HTTP, projection, generation, shadows, PNG encoding,
decode of the answer), warm, several times: strokes whose neighbours were decoded before (the
median, min and server columns) and strokes whose neighbours are all new (the last column).
Models:

- `--model FOLDER` (repeatable): trained model folders, e.g. the demo's `demo-out/run/model`;
- the full released-size 512 model, built with RANDOM weights and random banks of the
  released sizes (11,456 + 6,247 latents per component): its timings are real, its faces
  meaningless. `--no-full` leaves it out.

    python -m benchmarks.app_latency --model demo-out/run/model [--runs 5]
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import platform
import statistics
import sys
import threading
import time
import urllib.request

import numpy as np
import torch

from dfd_data.devices import prepare_for_inference
from dfd_data.errors import UserError
from dfd_data.image_io import encode_png
from dfd_model.config import ModelConfig
from dfd_model.serve import make_server
from dfd_model.sketch_to_face import SketchToFace

from benchmarks.measure import released_size_model


def stroke_sketch(seed: int) -> str:
    """A 512x512 page-like sketch: a face outline and a few strokes, as a PNG data URL."""
    import cv2

    rng = np.random.default_rng(seed)
    sketch = np.full((512, 512), 255, np.uint8)
    cv2.ellipse(sketch, (256, 270), (150, 200), 0, 0, 360, 0, 2)
    for _ in range(12):
        start = rng.integers(120, 400, 2)
        cv2.line(sketch, tuple(int(v) for v in start), tuple(int(v) for v in start + rng.integers(-40, 40, 2)), 0, 2)
    return "data:image/png;base64," + base64.b64encode(encode_png(sketch)).decode()


@contextlib.contextmanager
def serving(model: SketchToFace):
    """A fresh `dfd-model serve` server for `model` (with an empty shadow cache); yields its
    generate URL."""
    server = make_server(model, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/generate"
    finally:
        server.shutdown()
        server.server_close()


def stroke(url: str, sketch: str, shadow: bool) -> tuple[float, float]:
    """Post one stroke's request as the page does; (round trip s, the server's own s)."""
    body = json.dumps({"sketch": sketch, "refine": 1.0, "shadow": shadow}).encode()
    started = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    base64.b64decode(answer["face"].split(",", 1)[1])
    return time.perf_counter() - started, answer["seconds"]


def time_model(name: str, model: SketchToFace, runs: int) -> dict:
    """Round trips of strokes whose neighbours the server has decoded before (the same sketch
    again: the shadows come from its cache) and of strokes whose neighbours are all new (the
    first stroke on a fresh server: every neighbour is decoded for the shadows)."""
    model.eval()
    shadow = model.banks is not None
    with serving(model) as url:
        stroke(url, stroke_sketch(0), shadow)  # warms the model up
    cached, new, server_s = [], [], []
    for run in range(1, runs + 1):
        with serving(model) as url:
            new.append(stroke(url, stroke_sketch(run), shadow)[0])
            seconds, on_server = stroke(url, stroke_sketch(run), shadow)
            cached.append(seconds)
            server_s.append(on_server)
    return {"name": name, "resolution": model.config.resolution,
            # from the config: the inference rewrite keeps some weights as transformed buffers
            "parameters_m": sum(model.config.parameter_counts(training=False).values()) / 1e6,
            "median_s": statistics.median(cached), "min_s": min(cached), "model_s": statistics.median(server_s),
            "new_neighbours_s": statistics.median(new)}


def full_size_model() -> SketchToFace:
    # as `dfd-model serve` loads a model: channels-last, bf16 where native (from_pretrained)
    return prepare_for_inference(released_size_model(ModelConfig()), torch.device("cpu"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[], help="A trained model folder (repeatable).")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-full", action="store_true", help="Skip the full 512 model (random weights).")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}; stroke end -> face on screen, over HTTP, warm, {args.runs} runs")
    try:
        models = [(folder, SketchToFace.from_pretrained(folder, device="cpu")) for folder in args.model]
    except UserError as error:  # a missing or damaged model folder: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = [time_model(folder, model, args.runs) for folder, model in models]
    if not args.no_full:
        rows.append(time_model("full 512 model (random weights, released bank sizes)", full_size_model(), args.runs))
    print(f"{'model':58s} {'px':>4s} {'params':>8s} {'median s':>9s} {'min s':>7s} {'server s':>9s} "
          f"{'new neighbours s':>17s}")
    for row in rows:
        print(f"{row['name'][-58:]:58s} {row['resolution']:4d} {row['parameters_m']:7.1f}M {row['median_s']:9.2f} "
              f"{row['min_s']:7.2f} {row['model_s']:9.2f} {row['new_neighbours_s']:17.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
