"""Model size per network, and the CPU time and memory of one full-size SketchToFace inference.

Part 1 builds the default 512 config on the meta device (no memory used) and prints the
parameters of every network, next to the analytic counts `ModelConfig.parameter_counts`
gives without building anything.

Part 2 builds the same model for real on the CPU with RANDOM weights, attaches random feature
banks of the released sizes (11,456 female and 6,247 male latents per component), and times
warm, batch-1 inferences under torch.inference_mode, plus the stages on their own. The
weights are random, so the output image means nothing: only the timings and the memory are
meaningful (they do not depend on the weights' values).

Run from the repository root:

    python -m benchmarks.model_size [--runs 3] [--threads N] [--no-banks] [--sizes-only]

Peak memory is the process's peak resident set (getrusage), which includes building the
model; the resident set just before the timed inferences is printed beside it.
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch

from dfd_data.components import COMPONENTS
from dfd_model.config import ModelConfig
from dfd_model.networks import MultiscaleDiscriminator, count_parameters, fuse_feature_maps
from dfd_model.projection import blend, project
from dfd_model.sketch_to_face import SketchToFace, crop_sketch_components, prepare_sketch

from benchmarks.measure import RELEASED_BANKS, peak_rss_mb, released_size_banks



def rss_now_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2 ** 20


def print_sizes(config: ModelConfig) -> None:
    with torch.device("meta"):
        model = SketchToFace(config)
        discriminator = MultiscaleDiscriminator(config)
    analytic = config.parameter_counts()
    rows = []
    for name in COMPONENTS:
        rows.append((f"encoder.{name}", model.autoencoders[name].encoder))
        rows.append((f"image_decoder.{name}", model.autoencoders[name].decoder))
        rows.append((f"feature_decoder.{name}", model.feature_decoders[name]))
    rows += [("generator", model.generator), ("discriminator", discriminator)]
    print(f"Parameters at resolution {config.resolution} (meta device; fp32 MiB = 4 bytes each)")
    print(f"{'network':32s} {'parameters':>14s} {'fp32 MiB':>9s}")
    for name, module in rows:
        count = count_parameters(module)
        assert count == analytic[name], (name, count, analytic[name])
        print(f"{name:32s} {count:14,d} {count * 4 / 2 ** 20:9.1f}")
    fc = count_parameters(model.autoencoders["remainder"].encoder.fc)
    total = count_parameters(model)
    print(f"{'(remainder encoder Linear)':32s} {fc:14,d} {fc * 4 / 2 ** 20:9.1f}")
    print(f"{'SketchToFace total':32s} {total:14,d} {total * 4 / 2 ** 20:9.1f}")
    inference = total - sum(count_parameters(model.autoencoders[n].decoder) for n in COMPONENTS)
    print(f"{'  used by inference (no CE dec.)':32s} {inference:14,d} {inference * 4 / 2 ** 20:9.1f}")


def random_sketch(resolution: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    sketch = torch.full((1, resolution, resolution), 255, dtype=torch.uint8)
    sketch[torch.rand(sketch.shape, generator=generator) < 0.03] = 0
    return sketch


def timed(function, runs: int) -> list[float]:
    function()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def describe(times: list[float]) -> str:
    return f"median {statistics.median(times):7.3f} s (min {min(times):.3f}, max {max(times):.3f}, {len(times)} runs)"


def run_inference(config: ModelConfig, runs: int, with_banks: bool) -> None:
    print(f"\nInference on CPU, random weights: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    start = time.perf_counter()
    model = SketchToFace(config).eval()
    if with_banks:
        model.set_banks(released_size_banks(config.latent_dim))
    print(f"built in {time.perf_counter() - start:.1f} s; banks: "
          f"{'released sizes ' + str(RELEASED_BANKS) if with_banks else 'none (projection skipped)'}")
    sketch = random_sketch(config.resolution)
    gender = "female" if with_banks else None
    rss_before = rss_now_mb()
    peak_before = peak_rss_mb()
    with torch.inference_mode():
        whole = timed(lambda: model(sketch, refine=1.0, gender=gender), runs)
        x = prepare_sketch(sketch, config.resolution)
        crops = crop_sketch_components(x, config)
        latents = {n: model.autoencoders[n].encoder(crops[n]) for n in COMPONENTS}
        encode = timed(lambda: [model.autoencoders[n].encoder(crops[n]) for n in COMPONENTS], runs)
        stages = [("encode (5 encoders)", encode)]
        if with_banks:
            banks = {n: model.banks.get(n, gender) for n in COMPONENTS}
            stages.append(("project + blend (5, K=%d)" % config.knn, timed(
                lambda: [blend(latents[n], project(latents[n], banks[n], config.knn, config.lle_eps,
                                                   config.projection)[0], 1.0) for n in COMPONENTS], runs)))
        maps = {n: model.feature_decoders[n](latents[n]) for n in COMPONENTS}
        stages.append(("feature decoders (5)", timed(lambda: [model.feature_decoders[n](latents[n])
                                                              for n in COMPONENTS], runs)))
        stages.append(("fuse", timed(lambda: fuse_feature_maps(maps, config), runs)))
        fused = fuse_feature_maps(maps, config)
        stages.append(("generator", timed(lambda: model.generator(fused), runs)))
    print(f"{'whole forward, batch 1':28s} {describe(whole)}")
    for name, times in stages:
        print(f"  {name:26s} {describe(times)}")
    print(f"resident memory: {rss_before:,.0f} MiB before inference (model + banks), process peak "
          f"{peak_rss_mb():,.0f} MiB (peak before inference {peak_before:,.0f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-banks", action="store_true", help="skip the projection (no feature banks)")
    parser.add_argument("--sizes-only", action="store_true", help="print the parameter table only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig()
    print_sizes(config)
    if not args.sizes_only:
        torch.manual_seed(0)
        run_inference(config, args.runs, not args.no_banks)


if __name__ == "__main__":
    main()
