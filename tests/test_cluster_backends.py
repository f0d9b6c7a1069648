"""`--backend dask` and `--backend ray` on a local 2-worker cluster, and `--backend threading`,
give the same dataset, records and error reports as the default loky run, for align, build-sketches (a filter and
a network method) and crop-components."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from dfd_data import cluster
from dfd_data.dataset import Dataset, read_jsonl
from dfd_data.errors import ModelMissingError, UserError
from dfd_data.image_io import read_image
from dfd_data.weights import hed_weights_path
from tests.conftest import REPO, dfd_data, skip_without_extra
from tests.hostile import bad_files, good_variants, write_folder

NETWORK_METHOD = "photocopy+simplify"


def files_under(root: Path, folder: str) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / folder).rglob("*")) if p.is_file()}


def records(path: Path) -> list[dict]:
    return sorted(read_jsonl(path), key=lambda row: json.dumps(row, sort_keys=True))


@pytest.fixture(scope="module")
def photos(tmp_path_factory, sample_photos) -> Path:
    astronaut = read_image(sample_photos / "astronaut.png")
    bad = bad_files(astronaut)
    files = {**good_variants(astronaut), "empty.jpg": bad["empty.jpg"], "text.jpg": bad["text.jpg"],
             "grace hopper.jpg": (sample_photos / "grace_hopper.jpg").read_bytes()}
    return write_folder(tmp_path_factory.mktemp("cluster") / "photos", files)


def prepare(photos: Path, root: Path, *backend_args: str) -> dict[str, int]:
    """align + two sketch sets + crops with the given backend; returns each command's exit code."""
    codes = {"align": dfd_data("align", photos, root, "--size", "128", "--jobs", "2", *backend_args).returncode}
    for method in ("photocopy", NETWORK_METHOD):
        result = dfd_data("build-sketches", root, "--method", method, "--jobs", "2", "--quiet", "--preview", "0",
                          *backend_args)
        assert result.returncode == 0, result.stderr
        # (ray's notices about what the command chose, printed on every run, are left out)
        assert "Token authentication is enabled" not in result.stderr and "'context' argument" not in result.stderr
        codes[method] = result.returncode
    codes["crop"] = dfd_data("crop-components", root, "--jobs", "2", *backend_args).returncode
    return codes


@pytest.fixture(scope="module")
def loky_run(photos) -> Path:
    root = photos.parent / "loky"
    assert prepare(photos, root) == {"align": 1, "photocopy": 0, NETWORK_METHOD: 0, "crop": 0}
    return root


@pytest.mark.parametrize("backend", ["dask", "ray", "threading"])
def test_cluster_backend_builds_the_same_dataset_as_loky(photos, loky_run, backend, one_torch_thread):
    """threading runs every job in this one process: what workers share must be safe to share
    (one dlib detector shared by two threads once gave images each other's faces)."""
    skip_without_extra(backend)
    root = photos.parent / backend
    # align exits 1 like loky: the two broken photos failed, the others did not.
    assert prepare(photos, root, "--backend", backend) == {"align": 1, "photocopy": 0, NETWORK_METHOD: 0, "crop": 0}

    for folder in ("images", "sketches/photocopy", "components"):
        assert files_under(root, folder) == files_under(loky_run, folder), folder
    assert records(root / "records.jsonl") == records(loky_run / "records.jsonl")
    assert records(root / "errors.jsonl") == records(loky_run / "errors.jsonl")
    assert {row["file"].rsplit("/", 1)[-1] for row in read_jsonl(root / "errors.jsonl")} == {"empty.jpg", "text.jpg"}

    # The network ran in worker processes (one thread each) instead of this process: the same
    # sketches up to rounding of a few pixels.
    ours, theirs = files_under(root, f"sketches/{NETWORK_METHOD}"), files_under(loky_run, f"sketches/{NETWORK_METHOD}")
    assert ours.keys() == theirs.keys() and len(ours) == 12  # 11 sketches + records.jsonl
    for relpath in ours:
        if relpath.endswith(".png"):
            a, b = read_image(root / relpath).astype(int), read_image(loky_run / relpath).astype(int)
            assert np.mean(np.abs(a - b) > 2) < 0.001, relpath


@contextmanager
def dask_cluster(folder: Path, *worker_envs: dict, hidden: Path | None = None) -> Iterator[str]:
    """A dask scheduler and one single-threaded worker per environment in `worker_envs`, each
    its own process as on a real cluster; yields the scheduler's address once every worker has
    joined. With `hidden`, the workers run where an empty folder is mounted over it, as on a
    machine without the storage that holds it."""
    from dask.distributed import Client

    scheduler_file = folder / "scheduler.json"
    with ExitStack() as stack:
        def start(*command: str, env: dict | None = None) -> None:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(process.wait, 30)
            stack.callback(process.kill)

        start(sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file", str(scheduler_file),
              "--port", "0", "--dashboard-address", ":0")
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        worker = dask_worker(scheduler_file)
        if hidden is not None:  # (in a mount namespace of its own: the mount is the worker's alone)
            worker = ["unshare", "--mount", "sh", "-c", f'mount -t tmpfs none "{hidden}" && exec "$@"', "sh", *worker]
        for env in worker_envs:
            start(*worker, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
            if worker_envs:
                client.wait_for_workers(len(worker_envs), timeout=60)
            address = client.scheduler.address
        yield address


def dask_worker(scheduler_file: Path) -> list[str]:
    """The command of one single-threaded worker of the scheduler that wrote `scheduler_file`."""
    return [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
            "--nthreads", "1", "--no-nanny", "--dashboard-address", ":0"]


def test_a_dask_run_without_workers_says_so_and_goes_on_when_one_joins(dataset_copy, tmp_path):
    """A scheduler whose workers have not started holds the tasks: the run waited without a
    word. It now says so while it waits, and finishes once a worker joins."""
    pytest.importorskip("dask.distributed", reason="the [dask] extra is not installed")
    from dfd_data.cluster import NO_WORKER_NOTICE_SECONDS

    (tmp_path / "cluster").mkdir()
    with dask_cluster(tmp_path / "cluster") as address, open(tmp_path / "stderr", "w+") as stderr, ExitStack() as stack:
        run = subprocess.Popen([sys.executable, "-m", "dfd_data", "build-sketches", str(dataset_copy), "--method",
                                "canny", "--backend", "dask", "--scheduler", address, "--quiet", "--preview", "0"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        stack.callback(run.kill)
        deadline = time.monotonic() + NO_WORKER_NOTICE_SECONDS + 60
        while "has had no worker" not in (tmp_path / "stderr").read_text() and time.monotonic() < deadline:
            assert run.poll() is None, (tmp_path / "stderr").read_text()
            time.sleep(0.5)
        assert not list(dataset_copy.glob("sketches/**/*.png"))  # (nothing ran yet)
        worker = subprocess.Popen(dask_worker(tmp_path / "cluster" / "scheduler.json"), cwd=REPO,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        stack.callback(worker.wait, 30)
        stack.callback(worker.kill)
        assert run.wait(120) == 0
        lines = (tmp_path / "stderr").read_text().strip().splitlines()
    assert lines[0] == (f"dask: the scheduler at {address} has had no worker for {NO_WORKER_NOTICE_SECONDS} s; the "
                        f"run waits for one (start one with: dask worker {address}), or press Ctrl-C")
    assert lines[1:] in ([], ["dask: 1 worker joined; the run goes on"])  # (unless the run ended first)
    assert len(list((dataset_copy / "sketches" / "canny").glob("*.png"))) == 2


def test_ctrl_c_while_a_local_dask_cluster_starts_stops_the_command_once_it_is_up(monkeypatch):
    """Ctrl-C while the local cluster starts: it had been ignored there, and the command ran to
    its end. It now waits for the cluster to be up (whose workers inherit SIGINT blocked, so
    that this process alone stops them), then stops the command, the cluster closed."""
    pytest.importorskip("dask.distributed", reason="the [dask] extra is not installed")
    import dask.distributed

    closed = []

    class StartingCluster:
        def __init__(self, **options):
            assert signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # (the workers inherit the mask)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, while it starts

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            closed.append(exc[0])

    monkeypatch.setattr(dask.distributed, "LocalCluster", StartingCluster)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (pytest-xdist's workers ignore it)
    idle = threading.Event()  # a thread started before, which does not block SIGINT: it may take it
    threading.Thread(target=idle.wait, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt), cluster.cluster_session("dask", 2):
            pytest.fail("the session started")
    finally:
        idle.set()
        signal.signal(signal.SIGINT, previous)
    assert closed == [KeyboardInterrupt]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_the_workers_of_a_local_dask_cluster_leave_ctrl_c_to_the_command():
    """The local cluster's workers have SIGINT blocked, so that the command alone stops them."""
    pytest.importorskip("dask.distributed", reason="the [dask] extra is not installed")
    from dask.distributed import default_client

    with cluster.cluster_session("dask", 2):
        workers = default_client().run(os.getpid).values()
        blocked = [int(line.split()[1], 16) for pid in workers for line in Path(f"/proc/{pid}/status").open()
                   if line.startswith("SigBlk:")]
    assert len(blocked) == 2 and all(mask & 1 << (signal.SIGINT - 1) for mask in blocked), blocked


def sleep_then_square(task) -> int:
    time.sleep(0.3)
    return task.payload ** 2


def test_a_run_that_loses_its_dask_scheduler_stops_with_one_line_and_fails_no_file(tmp_path):
    """The scheduler killed mid-run: dask cancels every call it held. The run stops with one
    line, and the files it never tried are not failures (each had been recorded as one)."""
    pytest.importorskip("dask.distributed", reason="the [dask] extra is not installed")
    from dask.distributed import default_client

    from dfd_data.runner import Task, run_batch

    seen = []

    def kill_the_scheduler_after_the_first(outcome) -> None:
        seen.append(outcome)
        if len(seen) == 1:
            os.kill(default_client().run_on_scheduler(os.getpid), signal.SIGKILL)

    (tmp_path / "cluster").mkdir()
    with dask_cluster(tmp_path / "cluster", {}) as address, cluster.cluster_session("dask", 1, address):
        tasks = [Task(str(i), f"file{i}.png", i) for i in range(12)]
        with pytest.raises(UserError) as stopped:
            run_batch("demo", tasks, sleep_then_square, backend="dask", quiet=True,
                      on_outcome=kill_the_scheduler_after_the_first)
    assert str(stopped.value) == (f"dask: the run lost the connection to the scheduler at {address}; the files "
                                  "finished are recorded: run the command again for the rest")
    assert 1 <= len(seen) < 12 and {outcome.status for outcome in seen} == {"done"}


def square_slowly_for_zero(task) -> int:
    """Takes 8 s for the file whose payload is 0, no time for the others."""
    if task.payload == 0:
        time.sleep(8)
    return task.payload ** 2


def test_a_ray_run_records_each_file_as_it_ends_and_leaves_the_environment_as_it_was():
    """joblib's ray backend returned results only a round (4 calls per CPU) at a time: a slow
    file held back the records of its round, and Ctrl-C, SIGTERM or a lost head discarded
    them. Every other file is now recorded while the slow one still runs. ray.init had also
    left RAY_AUTH_MODE=token and other settings in the process's environment, which commands
    started from it later inherited."""
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    from dfd_data.runner import Task, run_batch

    environment = dict(os.environ)
    arrivals = {}
    started = time.monotonic()
    summary = run_batch("demo", [Task(str(i), f"file{i}.png", i) for i in range(12)], square_slowly_for_zero,
                        jobs=2, backend="ray", quiet=True,
                        on_outcome=lambda outcome: arrivals.__setitem__(outcome.task.payload, time.monotonic()))
    assert (summary.done, summary.failed) == (12, 0)
    assert max(arrivals, key=arrivals.get) == 0 and arrivals[0] - max(arrivals[i] for i in range(1, 12)) > 4, \
        {payload: round(moment - started, 1) for payload, moment in arrivals.items()}
    assert dict(os.environ) == environment


def test_the_worker_watch_says_when_workers_are_gone_and_when_they_are_back(monkeypatch):
    """(No dask needed: a stand-in client whose workers go and come.)"""
    import threading
    import types

    monkeypatch.setattr(cluster, "NO_WORKER_NOTICE_SECONDS", 0.2)
    monkeypatch.setattr(cluster, "_WATCH_SECONDS", 0.05)
    polls = iter([{"w1": 1}, {}, {}, {}, {}, {}, {"w1": 1, "w2": 1}, {}])  # one each 0.05 s
    said, done = [], threading.Event()

    def nthreads() -> dict:
        workers = next(polls, None)
        if workers is None:  # (a worker from then on: a late main thread must not see a second notice)
            done.set()
            return {"w1": 1}
        return workers

    client = types.SimpleNamespace(nthreads=nthreads, scheduler=types.SimpleNamespace(address="tcp://head:8786"))
    with cluster.dask_worker_watch(client, said.append):
        assert done.wait(30)
    assert said == ["dask: the scheduler at tcp://head:8786 has had no worker for 0.2 s; the run waits for one "
                    "(start one with: dask worker tcp://head:8786), or press Ctrl-C",
                    "dask: 2 workers joined; the run goes on"]


def test_a_worker_whose_machine_lacks_the_weights_stops_the_run_before_any_file(dataset_copy, tmp_path):
    """The command checks the weights on its own machine; on a cluster every worker checks too,
    before any file is given out. A worker without them had failed every file it took, and
    taken them faster than the healthy workers. So is a worker where the toolkit itself does
    not import (the check cannot run there: that once passed as a worker that had left)."""
    pytest.importorskip("dask.distributed", reason="the [dask] extra is not installed")
    try:
        hed_weights_path()
    except ModelMissingError as error:
        pytest.skip(f"HED weights absent on this machine: {error}")
    lacking_home = tmp_path / "empty-dfd-home"
    lacking_home.mkdir()
    (tmp_path / "broken" / "dfd_data").mkdir(parents=True)
    (tmp_path / "broken" / "dfd_data" / "__init__.py").write_text("raise ImportError('a broken install')\n")
    broken = {"PYTHONPATH": str(tmp_path / "broken"), "PYTHONSAFEPATH": "1"}  # (it comes before the real one)
    with dask_cluster(tmp_path, {}, {"DFD_HOME": str(lacking_home)}, broken) as address:
        result = dfd_data("build-sketches", dataset_copy, "--method", "hed", "--backend", "dask", "--scheduler",
                          address, "--quiet", "--preview", "0", timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    host = socket.gethostname()
    assert lines[0].startswith(f"Error: build-sketches:hed: 2 of the dask cluster's 3 workers cannot run this step, "
                               f"so no file was given out: machine {host}: HED weights not found at {lacking_home}"), \
        lines[0]
    assert f"; machine {host}: the check could not run there (ImportError('a broken install'))" in lines[0]
    assert not (dataset_copy / "sketches" / "hed").exists()
    assert "build-sketches:hed" not in Dataset(dataset_copy).load_manifest()["steps"]

    # a cluster of the healthy worker alone sketches every face
    (tmp_path / "healthy").mkdir()
    with dask_cluster(tmp_path / "healthy", {}) as address:
        result = dfd_data("build-sketches", dataset_copy, "--method", "hed", "--backend", "dask", "--scheduler",
                          address, "--quiet", "--preview", "0", timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(list(dataset_copy.glob("sketches/hed/*.png"))) == 2


def can_hide_folders() -> bool:
    """Whether this process may mount a folder over another in a mount namespace of its own (root
    on Linux, where the container allows it)."""
    try:
        return subprocess.run(["unshare", "--mount", "mount", "-t", "tmpfs", "none", "/mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_a_worker_that_cannot_see_the_dataset_stops_the_run_before_any_file(sample_dataset, tmp_path):
    """The dataset must be on storage every worker sees: a worker that did not see it had failed
    every file it took."""
    pytest.importorskip("dask.distributed", reason="the [dask] extra is not installed")
    if not can_hide_folders():
        pytest.skip("cannot mount a folder in a mount namespace here (needs root and unshare)")
    shutil.copytree(sample_dataset, tmp_path / "storage" / "faces")
    dataset = tmp_path / "storage" / "faces"
    (tmp_path / "cluster").mkdir()
    with dask_cluster(tmp_path / "cluster", {}, hidden=tmp_path / "storage") as address:
        result = dfd_data("build-sketches", dataset, "--method", "canny", "--backend", "dask", "--scheduler",
                          address, "--quiet", "--preview", "0", timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: build-sketches:canny: 1 of the dask cluster's 1 worker cannot run this step, so no file was given "
        f"out: machine {socket.gethostname()}: cannot see {dataset} (photos and datasets must be on storage every "
        f"worker sees, at the same path)"]
    assert not (dataset / "sketches").exists()


def test_sigterm_ends_a_ray_run_as_it_ends_a_local_one(dataset_copy, tmp_path):
    """On the local ray instance a command starts, SIGTERM had ray's handlers print about 40
    lines of C++ stack and abort (exit status 134); now it ends the command as without ray.
    RAY_ADDRESS=local, ray's name for such an instance, starts it the same way (it had been
    started off the main thread, as a remote cluster is, where ray sets no handler and warns)."""
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    stderr = _stderr_of_sigterm_once_running(["build-sketches", str(dataset_copy), "--method", NETWORK_METHOD,
                                              "--backend", "ray", "--jobs", "2", "--preview", "0"],
                                             {**os.environ, "RAY_ADDRESS": "local"}, tmp_path / "stderr")
    assert "SIGTERM" not in stderr


def _stderr_of_sigterm_once_running(args: list[str], env: dict, log: Path) -> str:
    """The stderr of `dfd-data ARGS`, sent SIGTERM as soon as its progress bar shows (once the
    run has connected to its cluster), which must end it at once (status 143)."""
    with open(log, "w+") as stderr:
        run = subprocess.Popen([sys.executable, "-m", "dfd_data", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=stderr, text=True)
        try:
            deadline = time.monotonic() + 120
            while f"{args[0]}:" not in log.read_text() and time.monotonic() < deadline:
                assert run.poll() is None, log.read_text()
                time.sleep(0.1)
            run.send_signal(signal.SIGTERM)
            assert run.wait(60) == -signal.SIGTERM
        finally:
            run.kill()
    return log.read_text()


RAY_TOKEN = "0123456789abcdef" * 2


@contextmanager
def ray_head(home: Path, cpus: int = 2) -> Iterator[tuple[subprocess.Popen, int]]:
    """(its process, its port): a ray head of `cpus` CPUs started apart (`ray start --head
    --block`) with token authentication, its token RAY_TOKEN and its own HOME (its token and
    the commands' stay out of this user's ~/.ray), stopped after the block."""
    home.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--port",
                             str(port), "--num-cpus", str(cpus), "--include-dashboard", "false", "--disable-usage-stats"],
                            env={**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, "the ray head did not start"
                time.sleep(0.2)
        yield head, port
    finally:
        head.terminate()  # (`ray start --block` stops every process of its node on SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()


def test_a_ray_head_started_apart_runs_the_commands_and_one_that_refuses_them_says_why(photos, loky_run, tmp_path):
    """RAY_ADDRESS names a head started with `ray start`, which turns token authentication on
    where a token exists (ray's local instances, ours too, leave one in ~/.ray), and ray sends
    its token to a given address only with RAY_AUTH_MODE=token. Without it the command is
    refused at once, in one line that says so (it had waited 20 s between a warning a second,
    then said "no ray head answered"); with the token it aligns as loky does, and SIGTERM ends
    a run there as it ends a local one."""
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    home = tmp_path / "home"
    with ray_head(home) as (_, port):
        env = {**os.environ, "HOME": str(home), "RAY_ADDRESS": f"127.0.0.1:{port}"}
        started = time.monotonic()
        refused = dfd_data("align", photos, tmp_path / "refused", "--backend", "ray", timeout=120, env=env)
        assert refused.returncode == 1 and time.monotonic() - started < cluster.CONNECT_SECONDS, refused.stderr
        assert refused.stderr.strip().splitlines()[-1].startswith(
            f"Error: ray: the cluster at RAY_ADDRESS=127.0.0.1:{port} refused this command (") and \
            "needs RAY_AUTH_MODE=token here" in refused.stderr, refused.stderr
        root = tmp_path / "faces"
        result = dfd_data("align", photos, root, "--size", "128", "--jobs", "2", "--backend", "ray", timeout=300,
                          env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN})
        assert result.returncode == 1, result.stderr  # the two broken photos, as with loky
        assert "SIGTERM handler is not set" not in result.stderr  # (ray's notice of what the command chose)
        assert files_under(root, "images") == files_under(loky_run, "images")
        assert records(root / "records.jsonl") == records(loky_run / "records.jsonl")
        assert records(root / "errors.jsonl") == records(loky_run / "errors.jsonl")
        # SIGTERM ends a run there as it ends a local one (ray's handler had printed 8 lines of C++ stack)
        stderr = _stderr_of_sigterm_once_running(
            ["align", str(photos), str(tmp_path / "stopped"), "--size", "128", "--jobs", "2", "--backend", "ray"],
            {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN}, tmp_path / "stderr")
        assert "SIGTERM" not in stderr


def test_a_ray_run_without_cpus_says_so_and_goes_on_when_a_node_joins(dataset_copy, tmp_path):
    """A ray cluster without CPUs (a head started with none, its nodes not started yet) holds
    the tasks: the run waited without a word. It now says so while it waits, as with dask,
    and finishes once a node with a CPU joins."""
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    from dfd_data.cluster import NO_WORKER_NOTICE_SECONDS

    home, log = tmp_path / "home", tmp_path / "stderr"
    with ray_head(home, cpus=0) as (_, port), open(log, "w+") as stderr, ExitStack() as stack:
        env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN}
        run = subprocess.Popen([sys.executable, "-m", "dfd_data", "build-sketches", str(dataset_copy), "--method",
                                "canny", "--backend", "ray", "--quiet", "--preview", "0"], cwd=REPO,
                               env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, stdout=subprocess.DEVNULL,
                               stderr=stderr, text=True)
        stack.callback(run.kill)
        deadline = time.monotonic() + NO_WORKER_NOTICE_SECONDS + 60
        while "had no CPU" not in log.read_text() and time.monotonic() < deadline:
            assert run.poll() is None, log.read_text()
            time.sleep(0.5)
        assert not list(dataset_copy.glob("sketches/**/*.png"))  # (nothing ran yet)
        node = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--address",
                                 f"127.0.0.1:{port}", "--block", "--num-cpus", "1", "--disable-usage-stats"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        stack.callback(node.wait, 60)
        stack.callback(node.terminate)  # (`--block`: SIGTERM stops the node's processes)
        assert run.wait(180) == 0, log.read_text()
    notices = [line for line in log.read_text().splitlines() if line.startswith("ray: ")]
    address = r"[\d.]+:%d" % port
    assert len(notices) == 2 and re.fullmatch(
        rf"ray: the cluster at ({address}) had no CPU as the run began, and no call has ended in "
        rf"{NO_WORKER_NOTICE_SECONDS} s; the run waits \(start a node with CPUs: ray start --address \1; an "
        r"autoscaler starts its own\), or press Ctrl-C", notices[0]), notices
    assert notices[1] == "ray: calls have begun to end; the run goes on"
    assert len(list((dataset_copy / "sketches" / "canny").glob("*.png"))) == 2


# Runs 40 files of sleep_then_square on the ray head at RAY_ADDRESS and kills the head's
# process group (argv[1]) as the first ends; prints each file's status, then the error's line.
_LOSE_THE_HEAD = """
import os, signal, sys
from dfd_data import cluster
from dfd_data.errors import UserError
from dfd_data.runner import Task, run_batch
from tests.test_cluster_backends import sleep_then_square

cluster.HEAD_SILENCE_SECONDS = 3
seen = []

def kill_the_head_after_the_first(outcome):
    seen.append(outcome.status)
    if len(seen) == 1:
        os.killpg(int(sys.argv[1]), signal.SIGKILL)

try:
    with cluster.cluster_session("ray", 2):
        run_batch("demo", [Task(str(i), f"file{i}.png", i) for i in range(40)], sleep_then_square, backend="ray",
                  quiet=True, on_outcome=kill_the_head_after_the_first)
except UserError as error:
    print(" ".join(seen))
    print(error)
"""


def test_a_run_that_loses_its_ray_head_stops_with_one_line_and_every_finished_file_recorded(tmp_path):
    """The head killed mid-run: ray had waited 60 s without a word, ignoring Ctrl-C, then ended
    the process from C++ (status 1, no summary), and the finished files of the round at work
    were not recorded. Now the run stops with one line once the head has been silent for
    HEAD_SILENCE_SECONDS (3 here), every file that ended before recorded. (The run is a process
    of its own: ray keeps a process's first token.)"""
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    home = tmp_path / "home"
    with ray_head(home) as (head, port):
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-c", _LOSE_THE_HEAD, str(head.pid)], cwd=REPO, capture_output=True,
                             text=True, timeout=120,
                             env={**os.environ, "HOME": str(home), "RAY_ADDRESS": f"127.0.0.1:{port}",
                                  "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN})
    assert run.returncode == 0 and time.monotonic() - started < 45, run.stderr
    statuses, line = run.stdout.strip().splitlines()
    assert 1 <= len(statuses.split()) < 40 and set(statuses.split()) == {"done"}
    assert re.fullmatch(r"ray: the cluster's head at [\d.]+:\d+ has not answered for 3 s \(stopped, or out of "
                        r"reach\); the files finished are recorded: run the command again for the rest", line), line


def test_the_ray_head_watch_stops_a_run_only_for_a_head_it_reached_that_went_silent(monkeypatch):
    """(No ray needed: a listening socket stands for the head's GCS port.) An address not
    reached as the run began (a ray:// client may see the head under the cluster's own address)
    never stops the run; one reached, once it refuses connections for HEAD_SILENCE_SECONDS,
    does."""
    monkeypatch.setattr(cluster, "_WATCH_SECONDS", 0.01)
    monkeypatch.setattr(cluster, "HEAD_SILENCE_SECONDS", 0.3)
    server = socket.create_server(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % server.getsockname()[1]
    watch = cluster.RayHeadWatch(address)
    never_reached = cluster.RayHeadWatch("10.255.255.1:1")  # (no route: the connection times out)
    watch.check()
    server.close()
    started = time.monotonic()
    with pytest.raises(UserError, match=rf"^ray: the cluster's head at {address} has not answered for 0.3 s "
                                        r"\(stopped, or out of reach\); the files finished are recorded"):
        while time.monotonic() - started < 5:
            watch.check()
            never_reached.check()
            time.sleep(0.02)
    assert time.monotonic() - started >= 0.3 and never_reached.answers()


def test_scheduler_address_only_goes_with_dask(photos, tmp_path):
    result = dfd_data("align", photos, tmp_path / "faces", "--backend", "ray", "--scheduler", "tcp://x:1")
    assert result.returncode == 1
    assert "--scheduler is a dask address" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_dask_scheduler_is_one_clear_line(photos, tmp_path):
    """Nothing listening, a malformed address, and a server that accepts the connection and
    never answers (the dashboard's port given by mistake), which once hung the command: one
    line within dask's own connect timeout (set to 2 s here, as a user's dask configuration
    may) and the few seconds given beyond it."""
    pytest.importorskip("dask.distributed", reason="the [dask] extra is not installed")
    quick = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    waited = f"answered in {2 + cluster.CONNECT_MARGIN_SECONDS} s)"
    with socket.create_server(("127.0.0.1", 0)) as silent:
        # (dask's own words for a refused connection: "... after 2 s")
        for address, says in (("tcp://127.0.0.1:9", "after 2 s"), ("localhost", ""),
                               (f"tcp://127.0.0.1:{silent.getsockname()[1]}", waited)):
            started = time.monotonic()
            result = dfd_data("align", photos, tmp_path / "faces", "--backend", "dask", "--scheduler", address,
                              timeout=120, env=quick)
            assert result.returncode == 1, address
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"Error: --scheduler {address}: cannot reach the dask "
                                                           "scheduler") and says in lines[0], result.stderr
            # (the command's start, torch's import included, takes a few seconds of its own)
            assert time.monotonic() - started < 2 + cluster.CONNECT_MARGIN_SECONDS + 10, address
    # a setting dask cannot read is one line too
    result = dfd_data("align", photos, tmp_path / "faces", "--backend", "dask", "--scheduler", "tcp://127.0.0.1:9",
                      timeout=120, env={**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "soon"})
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "Error: dask's setting distributed.comm.timeouts.connect is 'soon': not a positive duration (e.g. 30s); "
        "see DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT and your dask configuration"], result.stderr


def test_unreachable_ray_address_is_one_clear_line(photos, tmp_path):
    """ray.init retries an address nothing listens at for ever."""
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    result = dfd_data("align", photos, tmp_path / "faces", "--backend", "ray", timeout=120,
                      env={**os.environ, "RAY_ADDRESS": "127.0.0.1:9"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ray: cannot reach the cluster at "
                                                             "RAY_ADDRESS=127.0.0.1:9")


def test_a_cluster_that_answers_but_is_not_one_is_one_line_in_time(monkeypatch):
    """A RAY_ADDRESS port that accepts connections but is no ray head made ray.init retry for
    ever (over 5 minutes, measured); an HTTP server given as --scheduler read as a message of
    exabytes. Both are one line, the first within the connection time."""
    import threading
    import types

    never = threading.Event()
    ray = types.ModuleType("ray")
    ray.is_initialized, ray.shutdown = (lambda: False), (lambda: None)
    ray.init = lambda **options: never.wait()  # what ray.init does against such a port
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setattr(cluster, "CONNECT_SECONDS", 1)
    monkeypatch.setattr(cluster, "_check_ray_address", lambda address: None)  # (its port does accept)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with pytest.raises(UserError, match=r"^ray: cannot start or reach the cluster at 127\.0\.0\.1:6379 \(no ray "
                                        r"head answered in 1 s\)$"):
        with cluster.cluster_session("ray", 1):
            pass
    never.set()

    def http_server_answers(address, timeout):
        raise MemoryError("Unable to allocate 3.07 EiB for an array")  # dask reading HTTP as a frame length

    # (its connect timeout is a setting that importing distributed declares, as the command does
    # before it connects: run alone, this test had met a KeyError)
    pytest.importorskip("dask.distributed", reason="the [dask] extra is not installed")

    with pytest.raises(UserError, match="what answered there is not a dask scheduler"):
        with cluster._connect_dask(http_server_answers, "tcp://127.0.0.1:8797"):
            pass


def test_the_cluster_check_names_a_few_machines_per_cause_and_counts_the_rest(monkeypatch):
    """Fifty machines without the weights make one short line, not fifty copies of the cause."""
    from dfd_data import worker_check

    answers = [(f"node{i:02d}", "HED weights not found at /w") for i in range(50)] + \
        [("node50", None), ("node51", "cannot see /data"), ("node51", "cannot see /data")]
    monkeypatch.setattr(worker_check, "connected", lambda backend: True)
    monkeypatch.setattr(worker_check, "_dask_answers", lambda *probe_args: (55, answers))
    with pytest.raises(UserError) as raised:
        worker_check.check_workers("dask", "align", writes=("/data",))
    assert str(raised.value) == ("align: 52 of the dask cluster's 55 workers, 53 of which answered, cannot run this "
                                 "step, so no file was given out: machines node00, node01, node02 and 47 more: HED "
                                 "weights not found at /w; machine node51: cannot see /data")
    worker_check.check_workers("threading", "align", writes=("/data",))  # local backends: nothing to check
