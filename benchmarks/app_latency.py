"""Drawing-app latency: from the end of a stroke to the new face, over real HTTP on this machine.

For each model it starts `dfd-model serve`'s server in this process, posts the request the
page sends after a stroke (the 512x512 sketch PNG as a data URL, refinement, shadow on), and
times the full round trip (encode, HTTP, projection, generation, shadows, PNG encoding,
decode of the answer), warm, several times. Models:

- `--model FOLDER` (repeatable): trained model folders, e.g. the demo's `demo-out/run/model`;
- the full released-size 512 model, built with RANDOM weights and random banks of the
  released sizes (11,456 + 6,247 latents per component): its timings are real, its faces
  meaningless. `--no-full` leaves it out.

    python -m benchmarks.app_latency --model demo-out/run/model [--runs 5]
"""
from __future__ import annotations

import argparse
import base64
import json
import platform
import statistics
import threading
import time
import urllib.request

import numpy as np
import torch

from dfd_data.devices import prepare_for_inference
from dfd_data.image_io import encode_png
from dfd_model.config import ModelConfig
from dfd_model.serve import make_server
from dfd_model.sketch_to_face import SketchToFace

from benchmarks.measure import released_size_banks



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


def time_model(name: str, model: SketchToFace, runs: int) -> dict:
    server = make_server(model.eval(), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api/generate"
    times, model_times = [], []
    try:
        for run in range(runs + 1):  # the first request warms up
            body = json.dumps({"sketch": stroke_sketch(run), "refine": 1.0, "shadow": model.banks is not None})
            started = time.perf_counter()
            request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=600) as response:
                answer = json.loads(response.read())
            base64.b64decode(answer["face"].split(",", 1)[1])
            if run:
                times.append(time.perf_counter() - started)
                model_times.append(answer["seconds"])
    finally:
        server.shutdown()
        server.server_close()
    return {"name": name, "resolution": model.config.resolution,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "median_s": statistics.median(times), "min_s": min(times), "model_s": statistics.median(model_times)}


def full_size_model() -> SketchToFace:
    config = ModelConfig()
    banks = released_size_banks(config.latent_dim, seed=0)
    # as `dfd-model serve` loads a model: channels-last, bf16 where native (from_pretrained)
    return prepare_for_inference(SketchToFace(config, banks), torch.device("cpu"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[], help="A trained model folder (repeatable).")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-full", action="store_true", help="Skip the full 512 model (random weights).")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}; stroke end -> face on screen, over HTTP, warm, {args.runs} runs")
    rows = [time_model(folder, SketchToFace.from_pretrained(folder, device="cpu"), args.runs) for folder in args.model]
    if not args.no_full:
        rows.append(time_model("full 512 model (random weights, released bank sizes)", full_size_model(), args.runs))
    print(f"{'model':58s} {'px':>4s} {'params':>8s} {'median s':>9s} {'min s':>7s} {'server s':>9s}")
    for row in rows:
        print(f"{row['name'][-58:]:58s} {row['resolution']:4d} {row['parameters_m']:7.1f}M {row['median_s']:9.2f} "
              f"{row['min_s']:7.2f} {row['model_s']:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
