"""The kill harness: `mixq quantize --budget` (a profile in phases, then block after block) killed with
SIGKILL right after each checkpoint it writes and at random moments, then rerun: the output's bytes
equal an uninterrupted run's; `mixq profile` likewise. A file system that refuses a write (a
per-process file size limit stands in for a full disk) gives one error line and leaves the previous
checkpoint usable."""

import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import save_tiny_model
from mixq.checkpoint import work_dir

pytestmark = pytest.mark.slow
N_BLOCKS = 3
KILLER = Path(__file__).with_name("killed_at_checkpoint.py")


@pytest.fixture(scope="module")
def job(tmp_path_factory, text_file):
    model = save_tiny_model(tmp_path_factory.mktemp("resume") / "llama", num_hidden_layers=N_BLOCKS)
    args = ["quantize", str(model), "--budget", "5bpw", "--calib-text", str(text_file), "--calib-windows", "8",
            "--calib-len", "64", "--held-out-windows", "2", "--held-out-len", "64", "--fisher-windows", "2",
            "--bits-options", "2,4,8", "--group-sizes", "32,64"]
    return args


def command(job, out):
    return [sys.executable, "-m", "mixq.cli", *job, "--out", str(out)]


def run(job, out, **kwargs):
    return subprocess.run(command(job, out), capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(job, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    start = time.perf_counter()
    done = run(job, out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, time.perf_counter() - start


def killed_after(job, out, n_checkpoints=None, seconds=None):
    """Run the job and SIGKILL it right after its n-th checkpoint change (tests/killed_at_checkpoint.py),
    or after `seconds`; True if it was killed before it finished."""
    if n_checkpoints is not None:
        done = subprocess.run([sys.executable, str(KILLER), str(n_checkpoints), *job, "--out", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert done.returncode in (0, -signal.SIGKILL), done.stderr[-2000:]
        return done.returncode == -signal.SIGKILL
    proc = subprocess.Popen(command(job, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def assert_same_output(out, whole):
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert not work_dir(out).exists()


def resume_and_compare(job, out, whole, resumes=True):
    """Rerun a killed job and compare its output with an uninterrupted run's. A kill after the output
    was renamed into place (while the work directory was being removed) leaves that output whole:
    it is compared as it is, and a rerun would rightly refuse to replace it."""
    if out.exists():
        assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
        return
    done = run(job, out)
    assert done.returncode == 0 and ("resuming from" in done.stderr or not resumes), done.stderr[-2000:]
    assert_same_output(out, whole)


def test_killed_after_each_checkpoint_then_resumed(job, uninterrupted, tmp_path):
    whole, _ = uninterrupted
    resumed_from = set()
    n = 0
    while True:
        n += 1
        out = tmp_path / f"after-{n}"
        if not killed_after(job, out, n_checkpoints=n):
            break  # it finished before its n-th checkpoint: every one was a kill point
        resumed_from.update(p.name for p in work_dir(out).glob("*"))
        resume_and_compare(job, out, whole)
    assert n > 2 * N_BLOCKS + 4  # the profile's phases and blocks, then the quantized blocks
    assert {"profile-fisher.safetensors", "profile-capture.safetensors", "profile-gains.safetensors",
            "profile-kl.safetensors", "mixq.profile", "blocks.safetensors"} <= resumed_from


def test_killed_at_random_moments_then_resumed(job, uninterrupted, tmp_path):
    whole, _ = uninterrupted
    start = time.perf_counter()
    assert run(job, tmp_path / "warm").returncode == 0  # timed with warm caches (the first run samples text)
    seconds = time.perf_counter() - start
    assert_same_output(tmp_path / "warm", whole)
    rng = random.Random(0)
    kills = 0
    for i in range(5):
        out = tmp_path / f"random-{i}"
        if killed_after(job, out, seconds=rng.uniform(0.15, 0.85) * seconds):
            kills += 1
            resume_and_compare(job, out, whole, resumes=False)  # an early kill may precede every checkpoint
        else:
            assert_same_output(out, whole)
    assert kills >= 3


def test_a_rerun_with_other_inputs_is_refused(job, tmp_path):
    out = tmp_path / "other"
    assert killed_after(job, out, n_checkpoints=2)
    other = [*job[:3], "4.5bpw", *job[4:]]  # another budget
    refused = run(other, out)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1].startswith("mixq: error: ") and "differ in: settings" in refused.stderr
    assert run([*other, "--restart"], out).returncode == 0 and not work_dir(out).exists()


def test_a_full_disk_is_one_error_and_the_checkpoint_survives(job, tmp_path):
    no_fisher = [*job[: job.index("--fisher-windows") + 1], "0", *job[job.index("--fisher-windows") + 2:]]
    whole, out = tmp_path / "whole", tmp_path / "full"
    assert run(no_fisher, whole).returncode == 0

    def small_files():  # every file this process writes stops at 128 KiB, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 17, 1 << 17))

    # the (empty) Fisher checkpoint is written, the first block's state (its 128 KiB of hidden states) is not
    failed = run(no_fisher, out, preexec_fn=small_files)
    assert failed.returncode == 2, failed.stderr[-2000:]
    errors = [line for line in failed.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("mixq: error: cannot write ") and "File too large" in errors[0]
    assert not out.exists() and (work_dir(out) / "profile-fisher.safetensors").is_file()
    assert not list(work_dir(out).glob(".*.partial"))  # the failed write left nothing half-written
    done = run(no_fisher, out)
    assert done.returncode == 0 and "resuming from" in done.stderr, done.stderr[-2000:]
    assert_same_output(out, whole)


def test_a_killed_profile_resumes_to_the_same_tables(job, tmp_path):
    from safetensors.numpy import load_file

    profile_job = ["profile", *[a for a in job[1:] if a not in ("--budget", "5bpw")]]
    whole = tmp_path / "whole.profile"
    assert run(profile_job, whole).returncode == 0
    for n in (2, 5):
        out = tmp_path / f"killed-{n}.profile"
        assert killed_after(profile_job, out, n_checkpoints=n)
        done = run(profile_job, out)
        assert done.returncode == 0 and "resuming from" in done.stderr, done.stderr[-2000:]
        ours, theirs = load_file(str(out)), load_file(str(whole))
        assert ours.keys() == theirs.keys()
        for k in ours:
            assert np.array_equal(ours[k], theirs[k], equal_nan=ours[k].dtype.kind == "f"), k
        assert not work_dir(out).exists()
