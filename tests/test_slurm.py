"""deploy/slurm.sh, as written, on a real one-node Slurm cluster brought up in a temp dir.

Needs Debian's `slurm-wlm` and `munge` (`.ci/run` installs them when it runs as root with
apt) and root: slurmd launches jobs as their user. Otherwise the test is skipped, saying
which. The cluster is private to the test: its own munge key and socket, slurm.conf,
state and spool dirs, free ports and a random first job id (so the job's run dir
`/tmp/tokenfeed-<job id>` never meets another run's); `proctrack/linuxproc` and
`task/none`, so it needs no cgroups. Every daemon is a child of the test, stopped at
teardown.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenfeed.common.shm import SHM_DIR

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "scancel")
START_TIMEOUT_S = 30.0
JOB_TIMEOUT_S = 150.0
DAEMON_ID = re.compile(r" tokenfeed ((\d+)-\d+-\d+-[0-9a-f]+) INFO ")  # a log line's id


def _missing() -> str | None:
    absent = [p for p in PROGRAMS if shutil.which(p) is None
              and not Path("/usr/sbin", p).exists()]
    if absent:
        return (f"Slurm is not installed ({', '.join(absent)} missing): "
                "apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        return "slurmd must run as root to launch jobs; run this test as root"
    if (os.cpu_count() or 1) < 2:
        return "the recipe asks for --cpus-per-task=2; this machine has 1 CPU"
    return None


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """munged, slurmctld and slurmd for one node, all in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        munge = root / "munge"
        munge.mkdir(mode=0o755)
        for name in ("state", "spool", "log"):
            (root / name).mkdir()
        self.socket = munge / "socket"
        subprocess.run([_program("mungekey"), "--create", f"--keyfile={munge / 'key'}"],
                       check=True, capture_output=True)
        self.conf = root / "slurm.conf"
        node = socket.gethostname().split(".")[0]  # the name slurmd looks itself up by
        self.conf.write_text(f"""\
ClusterName=tokenfeedtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
FirstJobId={random.randrange(100_000, 900_000)}
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        munge = self.root / "munge"
        self._spawn(_program("munged"), "-F", f"--socket={self.socket}",
                    f"--key-file={munge / 'key'}", f"--pid-file={munge / 'pid'}",
                    f"--log-file={munge / 'log'}", f"--seed-file={munge / 'seed'}")
        self._until(self.socket.exists, "munged made no socket")
        self._spawn(_program("slurmctld"), "-D", "-i", "-f", str(self.conf))
        self._spawn(_program("slurmd"), "-D", "-f", str(self.conf))
        self._until(lambda: self.sinfo() == "idle", "the node did not come up idle")

    def sinfo(self) -> str:
        result = subprocess.run([_program("sinfo"), "-h", "-o", "%T"], env=self.env,
                                capture_output=True, text=True, timeout=10)
        return result.stdout.strip()

    def _spawn(self, *cmd: str) -> None:
        log = open(self.root / "log" / f"{Path(cmd[0]).name}.out", "wb")  # noqa: SIM115
        with log:
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                               env=self.env))

    def _until(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise AssertionError(f"{what} ({dead or 'timeout'}):\n{self.logs()}")
            time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.root / "log").iterdir()))

    def stop(self) -> None:
        if len(self.procs) > 1 and self.procs[1].poll() is None:  # slurmctld is up
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run([_program("scancel"), "--full", "--user=root"], env=self.env,
                               capture_output=True, timeout=10)
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    # Not in tmp_path: munged wants every directory above its socket executable by all,
    # and pytest's base temp dir is private (0700).
    root = Path(tempfile.mkdtemp(prefix="tf-slurm-", dir="/tmp"))
    root.chmod(0o755)
    c = Cluster(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _job_processes(job_id: str) -> list[int]:
    """Processes whose environment says they belong to the job (its steps' children too)."""
    needle = f"SLURM_JOB_ID={job_id}\0".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue  # gone, or not ours to read
    return found


def test_slurm_recipe_trains_two_cpu_ranks_and_leaves_nothing_behind(
    cluster: Cluster, corpus: Path, tmp_path: Path
) -> None:
    out, ckpt = tmp_path / "job.out", tmp_path / "ckpt"
    env = {**cluster.env, "DATA": str(corpus), "RDZV_PORT": str(_free_port()),
           # tokenfeed and torchrun of this environment, as a user's activated venv gives
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    # The command of issue 14, with a small batch so that 12 steps take seconds on CPU.
    cmd = [_program("sbatch"), "--wait", "--gpus-per-node=0", "--cpus-per-task=2",
           f"--output={out}", f"--chdir={REPO}", "deploy/slurm.sh", "examples/train.py",
           "--steps", "12", "--batch-size", "2", "--seq-len", "32", "--ckpt-dir", str(ckpt)]
    try:
        result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                                timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the job ran past {JOB_TIMEOUT_S:.0f} s:\n"
                             f"{out.read_text(errors='replace') if out.exists() else ''}"
                             f"\n{cluster.logs()}") from None
    job_id = result.stdout.split()[-1]
    log = out.read_text(errors="replace")
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{log}\n{cluster.logs()}"

    # Two CPU ranks trained 12 steps against the job's daemon, and saved their positions.
    for rank in (0, 1):
        assert re.search(rf"attached to stream \d+ \(train rank {rank}/2\)", log), log
        assert f"rank {rank}: step 12 loss" in log, log
        saved = torch.load(ckpt / f"rank{rank}.pt", weights_only=False)
        assert saved["step"] == 12 and saved["data"]["spec"]["world_size"] == 2
    # The trap stopped the daemon: a clean shutdown on its stop request.
    assert "shutting down (stop request)" in log, log
    found = DAEMON_ID.search(log)
    assert found is not None, log
    daemon_id, pid = found.group(1), int(found.group(2))

    # Nothing left: no segment of the daemon, no process of the job, no run dir.
    deadline = time.monotonic() + 10.0  # slurmstepd may still be reaping the batch step
    while _job_processes(job_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _job_processes(job_id) == []
    assert not Path(f"/proc/{pid}").exists()
    assert sorted(SHM_DIR.glob(f"tokenfeed-{daemon_id}-*")) == []
    assert not Path(f"/tmp/tokenfeed-{job_id}").exists()


def test_srun_tasks_without_a_launcher_read_their_own_streams(
    cluster: Cluster, start_daemon: Callable[..., Any], oracle: Callable[..., Any],
    tmp_path: Path
) -> None:
    """`srun --ntasks=2 python train.py`: no torchrun, no process group; each task's feed
    takes its rank from SLURM_PROCID and the world size from SLURM_NTASKS."""
    from conftest import window_digest
    from test_launchers import PROBE, B, N, T, clean_env, probe_results

    daemon = start_daemon(workers=1)
    env = {**clean_env(), "SLURM_CONF": cluster.env["SLURM_CONF"]}
    cmd = [_program("srun"), "--ntasks=2", "--cpus-per-task=1", f"--chdir={REPO}",
           sys.executable, str(PROBE), str(daemon.run_dir), str(N), str(tmp_path)]
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"srun ran past {JOB_TIMEOUT_S:.0f} s:\n{cluster.logs()}") from None
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{cluster.logs()}"
    results = probe_results(tmp_path)
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)], result.stdout
    for r in results:
        want = oracle(rank=r["rank"], world_size=2, batch_size=B, seq_len=T, n=N)
        assert r["digests"] == [window_digest(w, B, T) for w in want], f"task {r['rank']}"
