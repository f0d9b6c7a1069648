"""Memory and time of writing and resuming a full-size training checkpoint, beside the way
checkpoints were written before (safetensors.torch.save, then the bytes to disk).

The state is what a stage 2 trainer holds: the default 512 model with random weights,
channels-last as training keeps it, and Adam's moments for every parameter (6.3 GiB on
disk). Each measurement runs in a fresh process, so that their peaks do not mix:

- save, toolkit: save_checkpoint, which streams the tensors one at a time;
- save, baseline: contiguous CPU copies of every tensor, safetensors.torch.save, the bytes
  written atomically;
- resume: load_checkpoint of the toolkit's checkpoint into a fresh state, and whether the
  file is still memory-mapped afterwards.

Extra memory is the peak resident set during the call minus the resident set before it.
The baseline needs about 23 GiB in all, and the folder (default: a temporary one beside
this repository) 13 GiB of disk.

    python -m benchmarks.checkpoint_io [--folder DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 2 ** 30


def _status_gib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _trainer_state(with_moments: bool):
    """The full model channels-last and its Adam, with moments after one step when asked."""
    from benchmarks.measure import released_size_model
    from dfd_model.config import ModelConfig

    model = released_size_model(ModelConfig()).to(memory_format=torch.channels_last)
    adam = torch.optim.Adam(model.parameters(), fused=True)
    if with_moments:
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        adam.step()
        adam.zero_grad(set_to_none=True)
    return model, adam


def measure(kind: str, folder: Path) -> dict:
    """One measurement, in this process."""
    from dfd_data.atomic import atomic_write_bytes
    from dfd_model.training_checkpoint import TENSORS_FILE, load_checkpoint, save_checkpoint

    model, adam = _trainer_state(with_moments=kind != "resume")
    modules, optimizers = {"model": model}, {"adam": adam}
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")  # the peak resident set starts again from here
    before, started = _status_gib("VmRSS"), time.perf_counter()
    if kind == "save":
        save_checkpoint(folder, "toolkit", modules=modules, optimizers=optimizers, banks=None, state={})
    elif kind == "baseline":
        from safetensors.torch import save

        tensors = {f"model.{key}": value for key, value in model.state_dict().items()}
        tensors |= {f"adam.{index}.{key}": value for index, values in enumerate(adam.state.values())
                    for key, value in values.items()}
        atomic_write_bytes(folder / "baseline.safetensors",
                           save({key: value.detach().cpu().contiguous() for key, value in tensors.items()}))
    else:
        load_checkpoint(folder / "checkpoints" / "toolkit", modules=modules, optimizers=optimizers,
                        device=torch.device("cpu"))
    seconds, extra = time.perf_counter() - started, _status_gib("VmHWM") - before
    mapped = str((folder / "checkpoints" / "toolkit" / TENSORS_FILE).resolve())
    still_mapped = any(mapped in line for line in Path("/proc/self/maps").read_text().splitlines())
    return {"kind": kind, "seconds": seconds, "extra_gib": extra, "state_gib": before, "still_mapped": still_mapped}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_io", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, help="where the checkpoints are written (needs 13 GiB)")
    parser.add_argument("--one", choices=["save", "baseline", "resume"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.folder)))
        return 0
    folder = Path(tempfile.mkdtemp(prefix="dfd-checkpoint-io-", dir=args.folder or Path(__file__).parents[2]))
    try:
        rows = []
        for kind in ("save", "baseline", "resume"):
            done = subprocess.run([sys.executable, "-m", "benchmarks.checkpoint_io", "--one", kind, "--folder",
                                   str(folder)], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"checkpoint_io: {kind} failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
                return 1
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{kind:<9} {rows[-1]['seconds']:6.1f} s  +{rows[-1]['extra_gib']:5.2f} GiB over a state of "
                  f"{rows[-1]['state_gib']:.2f} GiB" + ("; the file stays mapped" if rows[-1]["still_mapped"] else ""),
                  flush=True)
        size = sum(path.stat().st_size for path in (folder / "checkpoints").rglob("*.safetensors")) / GIB
        save, baseline = rows[0], rows[1]
        print(f"checkpoint of {size:.2f} GiB: saved with {save['extra_gib']:.2f} GiB more memory against "
              f"{baseline['extra_gib']:.2f} GiB, in {save['seconds']:.1f} s against {baseline['seconds']:.1f} s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
