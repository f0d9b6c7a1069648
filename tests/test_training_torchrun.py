"""Training under torchrun: processes that stall, fail, lack a device or are interrupted, and
two gloo processes against one (in a file of their own, so that pytest-xdist's --dist loadfile
runs them beside the other training tests rather than after them)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfd_model.cli import main
from dfd_model.sketch_to_face import SketchToFace
from tests.conftest import REPO, TINY_SETTINGS, children, run_losses, running

pytestmark = pytest.mark.usefixtures("one_torch_thread")


STALLED_RANK = """
import os
import time
from datetime import timedelta

import torch

from dfd_model import distributed

# (4 s: the processes' start, a second or two apart on a busy machine, waits this long too)
distributed.COLLECTIVE_TIMEOUT, distributed.LONG_WAIT_TIMEOUT = timedelta(seconds=4), timedelta(seconds=60)


def say(line):
    # (one write per line: print's separate write of the newline let the two processes' lines
    # run together in the shared pipe, "rank 0: waited for allrank 1: waited for all")
    os.write(1, f"{line}\\n".encode())


ranks, device = distributed.start(torch.device("cpu"))
given = distributed.main_first(ranks, lambda: time.sleep(6) or "its result")
say(f"rank {ranks.rank}: main_first gave {given!r}")
time.sleep(6 if ranks.rank == 1 else 0)
distributed.wait_for_all(ranks)
say(f"rank {ranks.rank}: waited for all")
time.sleep(8 if ranks.rank == 1 else 0)
started = time.monotonic()
try:
    distributed.mean_over_ranks({"loss": 1.0}, ranks, device)
except RuntimeError as error:
    say(f"rank {ranks.rank}: timed out after {distributed.timed_out(error)} min, {time.monotonic() - started:.0f} s")
distributed.stop(ranks)  # as the trainer's close() does; without it a process may abort on exit
"""


def test_a_stalled_process_stops_the_run_after_the_collective_timeout_but_long_waits_may_take_longer(tmp_path):
    """Training collectives wait COLLECTIVE_TIMEOUT for a stalled process (it had been 4 hours,
    set for rank 0's long solo work); main_first, and the wait after every process has encoded
    the banks, wait LONG_WAIT_TIMEOUT in a group of their own. Here, with 4 s and 60 s: rank
    0's 6 s of work in main_first reaches the other process, a process 6 s late to the long
    wait is waited for, and a collective that the other process joins 8 s late fails on rank 0
    after 4 s. Leaving the process group after the timeout, as the trainer does, ends both
    processes cleanly."""
    script = tmp_path / "stalled_rank.py"
    script.write_text(STALLED_RANK)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script)], capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [line for line in result.stdout.splitlines() if line.startswith("rank ")]
    assert result.returncode == 0, result.stdout + result.stderr
    assert {"rank 0: main_first gave 'its result'", "rank 1: main_first gave None", "rank 0: waited for all",
            "rank 1: waited for all"} <= set(lines), result.stdout + result.stderr
    timed_out = [line for line in lines if line.startswith("rank 0: timed out after")]
    assert timed_out and timed_out[0].startswith(f"rank 0: timed out after {4 / 60}") and \
        int(timed_out[0].split()[-2]) <= 6, lines


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_more_processes_than_gpus_is_a_device_error_on_every_process(monkeypatch, local_rank):
    """torchrun's 2 processes on a machine with 1 GPU: every process of the machine stops with
    the same DeviceError before touching a device (cli.train lets its first process say it),
    where the second had met CUDA's "invalid device ordinal" traceback."""
    from dfd_data.errors import DeviceError
    from dfd_model import distributed

    for name, value in {"RANK": local_rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail(f"set_device({device}) was called"))
    with pytest.raises(DeviceError, match=r"^torchrun started 2 processes on this machine, which has 1 CUDA device\(s\): "
                                          r"one process per GPU \(--nproc-per-node 1 or fewer\)$"):
        distributed.start(torch.device("cuda"))


def test_a_process_group_that_cannot_start_is_one_line(sketched_dataset, tmp_path):
    """A process started by a launch script (MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE set
    for it) whose process group cannot start, here rank 0 with its store's port held by another
    program, stops with one line naming the store, not c10d's traceback."""
    with socket.create_server(("", 0)) as taken:
        port = taken.getsockname()[1]
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        result = subprocess.run([sys.executable, "-m", "dfd_model", "train", str(sketched_dataset), "--resolution",
                                 "128", "--steps", "1", "--quiet", "--out", str(tmp_path / "run"), *TINY_SETTINGS],
                                capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"Error: cannot start the process group with the run's other processes (store at 127.0.0.1:{port}): "), lines
    assert "EADDRINUSE" in lines[0]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_ctrl_c_under_torchrun_is_said_by_rank_0_alone(sketched_dataset, tmp_path, monkeypatch, rank):
    """A terminal's Ctrl-C reaches every process torchrun started: rank 0 says "Aborted!" and how
    to go on, the others say nothing (each had printed "Aborted!"); all end with the shell's code
    for it (rank 0, and a run without torchrun, had ended with 1)."""
    from dfd_model import training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "Trainer", interrupted)
    result = CliRunner().invoke(main, ["train", str(sketched_dataset), "--out", str(tmp_path / "run")],
                                env={"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": "2"})
    said = f"Aborted! (--out {tmp_path / 'run'} --resume continues the run from its latest checkpoint)" if rank == "0" \
        else ""
    assert (result.exit_code, result.output.strip()) == (130, said), result.output


def test_torchrun_with_two_cpu_processes_matches_one_process(sketched_dataset, tmp_path):
    """2 gloo processes x batch 2 against 1 process x batch 4: the same global batches, so
    the loss curves agree (BatchNorm sees per-process statistics, so not to the last bit);
    every checkpoint verified that both processes hold identical parameters."""
    common = [str(sketched_dataset), "--stage", "all", "--resolution", "128", "--steps", "6", "--log-every", "1",
              "--checkpoint-every", "3", "--quiet", *TINY_SETTINGS]
    # (the one-process runs run in this process: each command started had cost 5 to 10 s of imports)
    single = CliRunner().invoke(main, ["train", *common, "--batch-size", "4", "--out", str(tmp_path / "single")])
    assert single.exit_code == 0, single.output
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    double = subprocess.run([*launcher, "-m", "dfd_model", "train", *common, "--batch-size", "2",
                             "--out", str(tmp_path / "double")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("2 processes, global batch 4") == 1  # rank 0 alone prints
    one, two = run_losses(tmp_path / "single"), run_losses(tmp_path / "double")
    assert [(stage, step) for stage, step, _ in two] == [(stage, step) for stage, step, _ in one]
    first_one = [losses["total"] for stage, _, losses in one if stage == 1]
    first_two = [losses["total"] for stage, _, losses in two if stage == 1]
    assert first_two[-1] < first_two[0] and first_one[-1] < first_one[0]
    assert np.allclose(first_two, first_one, rtol=0.15)
    model = SketchToFace.from_pretrained(tmp_path / "double" / "model", device="cpu")
    assert sum(model.banks.counts()["nose"].values()) == 2
    # stopped after stage 1 and resumed by 2 processes, the run repeats the uninterrupted one
    # exactly: every process encodes the banks with the same batch norm statistics
    for stage, resume in (("1", []), ("all", ["--resume"])):
        cut = subprocess.run([*launcher, "-m", "dfd_model", "train", *common, "--batch-size", "2", *resume,
                              "--stage", stage, "--out", str(tmp_path / "cut")], capture_output=True, text=True,
                             cwd=REPO, timeout=600)
        assert cut.returncode == 0, cut.stderr[-3000:]
    assert run_losses(tmp_path / "cut") == two
    # a refusal is one line from rank 0, not one per process nor a connection error's traceback
    again = subprocess.run([*launcher, "-m", "dfd_model", "train", *common, "--batch-size", "2",
                            "--out", str(tmp_path / "cut")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode != 0
    assert [line for line in again.stderr.splitlines() if "Error" in line and "ChildFailedError" not in line] == \
        [f"Error: {tmp_path / 'cut'}: already holds a training run; pass --resume to continue it or choose another "
         "--out"]
    # resumed by one process with twice the batch, the run keeps its global batch (and batches);
    # with the same batch per process it goes on with half its global batch: said, not silent
    more = [arg if arg != "6" else "7" for arg in common]
    resumed = CliRunner().invoke(main, ["train", *more, "--batch-size", "4", "--resume", "--out", str(tmp_path / "double")])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming with batch_size 2 -> 4 per process (global batch 4 on 1 processes), steps 6 -> 7" \
        in resumed.stdout and "warning: the run's global batch" not in resumed.output
    halved = CliRunner().invoke(main, ["train", *more, "--batch-size", "2", "--resume", "--out", str(tmp_path / "cut")])
    assert halved.exit_code == 0, halved.output
    assert "warning: the run's global batch was 4 (2 processes), this one's is 2 (1)" in halved.stdout
    # a checkpoint every process finds damaged is one line, from rank 0 (each process had said it)
    latest = json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())["checkpoint"]
    with open(tmp_path / "cut" / "checkpoints" / latest / "tensors.safetensors", "ab") as tensors:
        tensors.write(b"x")
    damaged = subprocess.run([*launcher, "-m", "dfd_model", "train", *more, "--batch-size", "2", "--resume",
                              "--out", str(tmp_path / "cut")], capture_output=True, text=True, cwd=REPO, timeout=600)
    errors = [line for line in damaged.stderr.splitlines() if "Error" in line and "ChildFailedError" not in line]
    assert damaged.returncode != 0 and len(errors) == 1, damaged.stderr[-3000:]
    assert errors[0].startswith(f"Error: {tmp_path / 'cut' / 'checkpoints' / latest / 'tensors.safetensors'}: ")
    # so is a run configuration every process finds out of bounds (each had said it)
    settings = json.loads((tmp_path / "cut" / "train_config.json").read_text())
    settings["model"]["ngf"] = -1
    (tmp_path / "cut" / "train_config.json").write_text(json.dumps(settings))
    edited = subprocess.run([*launcher, "-m", "dfd_model", "train", str(sketched_dataset), "--resume", "--quiet",
                             "--out", str(tmp_path / "cut")], capture_output=True, text=True, cwd=REPO, timeout=600)
    errors = [line for line in edited.stderr.splitlines() if "Error" in line and "ChildFailedError" not in line]
    assert edited.returncode != 0 and len(errors) == 1, edited.stderr[-3000:]
    assert errors[0].startswith(f"Error: {tmp_path / 'cut' / 'train_config.json'}: model config: ngf=-1"), errors


def test_a_process_that_finds_another_gone_says_so_in_one_line(sketched_dataset, tmp_path, monkeypatch):
    """Under torchrun, a process whose collective finds another process gone (it ended with
    its own error, which it printed) ends with one line, not gloo's 50-line traceback; any
    other RuntimeError is a bug and keeps its traceback, as it does outside torchrun."""
    import dfd_model.training as training

    class PeerGone:  # (what rank 0 met in a real 2-process run whose rank 1 failed at step 3)
        error = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                             "closed by peer [127.0.0.1]:5309. This is typically caused by a remote worker crashing.")

        def __init__(self, *args, **kwargs):
            self.echo = lambda line: None

        def describe(self) -> str:
            return ""

        def run(self, stage):
            raise self.error

        def close(self):
            pass

    monkeypatch.setattr(training, "Trainer", PeerGone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = ["train", str(sketched_dataset), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and result.stdout == "" and result.stderr == (
        "Error: rank 0: stopped: another process of the run has ended (see its error; one stopped by Ctrl-C or a "
        "signal prints none): [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:5309. This is "
        "typically caused by a remote worker crashing.\n")
    PeerGone.error = RuntimeError("a bug")
    assert isinstance(CliRunner().invoke(main, args).exception, RuntimeError)
    import torch.distributed as dist  # (c10d's own errors are this process's faults too: a port in use)

    PeerGone.error = dist.DistNetworkError("The server socket has failed to listen on any local network address")
    assert isinstance(CliRunner().invoke(main, args).exception, dist.DistNetworkError)
    PeerGone.error = RuntimeError("Connection closed by peer")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert isinstance(CliRunner().invoke(main, args).exception, RuntimeError)


def test_a_missing_device_under_torchrun_is_reported_once_per_machine(sketched_dataset, tmp_path, monkeypatch):
    """`--device cuda` on a machine without CUDA fails in every process before they connect:
    the first process of each machine says so, the others exit quietly."""


    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    printed = {}
    for rank, local_rank in ((0, 0), (1, 1), (2, 0), (3, 1)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        result = CliRunner().invoke(main, ["train", str(sketched_dataset), "--out", str(tmp_path / "run"),
                                           "--device", "cuda"])
        assert result.exit_code == 1
        printed[rank] = result.stderr
    message = "--device cuda was asked for, but torch sees 0 CUDA device(s)"
    assert printed == {0: f"Error: {message}\n", 1: "", 2: f"Error: rank 2: {message}\n", 3: ""}


# A process in a mount namespace of its own with an empty tmpfs over the folder $0; runs "$@"
_OWN_VIEW = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"']


def test_a_process_that_cannot_see_the_run_folder_stops_the_run_with_one_line(sketched_dataset, tmp_path):
    """Rank 0 alone writes the run folder (configuration, stacked pairs, checkpoints) and the
    other processes read it: torchrun on several machines needs it on storage they share.
    Here rank 1 runs in a mount namespace of its own, with an empty tmpfs over the folder that
    holds the run, as a machine without that storage sees it."""
    runs = tmp_path / "runs"
    runs.mkdir()
    if shutil.which("unshare") is None or subprocess.run([*_OWN_VIEW, str(runs), "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -m` and a tmpfs mount (root) to give one process a view of the folders of its own")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    command = [sys.executable, "-m", "dfd_model", "train", str(sketched_dataset), "--resolution", "128", "--steps", "1",
               "--quiet", "--out", str(runs / "run"), *TINY_SETTINGS]
    blind = subprocess.Popen([*_OWN_VIEW, str(runs), *command], cwd=REPO, env={**env, "RANK": "1", "LOCAL_RANK": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        main_rank = subprocess.run(command, cwd=REPO, env={**env, "RANK": "0", "LOCAL_RANK": "0"},
                                   capture_output=True, text=True, timeout=180)
        _, blind_err = blind.communicate(timeout=60)
    finally:
        blind.kill()
    host = socket.gethostname()
    assert main_rank.returncode == 1 and main_rank.stderr.strip().splitlines() == [
        f"Error: {runs / 'run'}: rank 1 (on {host}) does not see this run folder as rank 0 (on {host}) does (No such "
        "file or directory): torchrun on several machines needs --out on storage that every machine shares"], \
        main_rank.stderr + blind_err
    assert blind.returncode == 1 and blind_err == "", blind_err
    assert sorted(path.name for path in (runs / "run").iterdir()) == [".training.lock", "train_config.json"]


def test_the_processes_of_a_torchrun_agent_killed_end_with_it(sketched_dataset, tmp_path):
    """torchrun's agent starts each process in a session of its own: killed (kill -9, an
    out-of-memory kill), it had left them training on, orphaned, into the run folder that a
    resumed run then wrote too. They now end with it."""
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "dfd_model", "train", str(sketched_dataset), "--resolution", "128", "--steps",
                              "100000", "--log-every", "1", "--quiet", "--out", str(tmp_path / "run"), *TINY_SETTINGS],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "stats.jsonl").exists():  # (training: both processes took their part)
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        workers = children(agent.pid)
        assert len(workers) == 2, workers
        agent.kill()
        agent.wait()
        deadline = time.monotonic() + 15
        while any(running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if running(pid)]
    finally:
        agent.kill()
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("arguments", [["/no/such/dataset"], ["DATASET", "--set", "no_such_setting=1"]])
def test_a_command_line_that_every_process_refuses_is_said_once_per_machine(sketched_dataset, tmp_path, arguments):
    """Every process torchrun starts reads the same command line: each had printed its
    refusal, with the usage. Rank 0 now says it with the usage, the first process of another
    machine (whose files may differ) in one line, the others nothing."""
    arguments = [str(sketched_dataset) if argument == "DATASET" else argument for argument in arguments]
    said = {}
    for rank, local_rank in (("0", "0"), ("1", "1"), ("2", "0")):
        result = CliRunner().invoke(main, ["train", *arguments, "--out", str(tmp_path / "run")],
                                    env={"RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": "4"})
        said[rank] = result.exit_code, result.output
    assert said["0"][0] == said["1"][0] == said["2"][0] == 2 and "Usage:" in said["0"][1] and said["1"][1] == "", said
    refusal = said["0"][1].strip().splitlines()[-1].removeprefix("Error: ")
    assert said["2"][1] == f"Error: rank 2: {refusal}\n", said
    assert not (tmp_path / "run").exists()
    # no command at all: the help, from rank 0 alone
    helped = [CliRunner().invoke(main, [], env={"RANK": rank, "LOCAL_RANK": "0", "WORLD_SIZE": "4"}) for rank in "02"]
    assert "Commands:" in helped[0].output and helped[1].output == "", helped[1].output
