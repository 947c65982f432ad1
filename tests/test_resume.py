"""The kill harness: `mixq quantize --budget` (a profile, then block after block) killed with SIGKILL
right after each checkpoint it writes and at random moments, then rerun: the output's bytes equal an
uninterrupted run's. A file system that refuses a write (a per-process file size limit stands in for
a full disk) gives one error line and leaves the previous checkpoint usable."""

import random
import resource
import signal
import subprocess
import sys
import time

import pytest

from conftest import save_tiny_model
from mixq.checkpoint import work_dir

pytestmark = pytest.mark.slow
N_BLOCKS = 5


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


def checkpoint_marks(resume):
    """What changes each time a checkpoint is written: the profile's arrival, the blocks file's
    inode (each write renames a new file into place)."""
    marks = []
    for name in ("mixq.profile", "blocks.safetensors"):
        try:
            marks.append((name, (resume / name).stat().st_ino))
        except FileNotFoundError:
            pass
    return tuple(marks)


def killed_after(job, out, n_checkpoints=None, seconds=None):
    """Start the job, SIGKILL it after its n-th checkpoint write (or after `seconds`); True if it was
    killed before it finished."""
    proc = subprocess.Popen(command(job, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume, seen, last, start = work_dir(out), 0, (), time.perf_counter()
    while proc.poll() is None:
        marks = checkpoint_marks(resume)
        if marks != last and marks:
            seen, last = seen + 1, marks
        if (n_checkpoints is not None and seen >= n_checkpoints) or \
                (seconds is not None and time.perf_counter() - start >= seconds):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


def assert_same_output(out, whole):
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert not work_dir(out).exists()


def test_killed_after_each_checkpoint_then_resumed(job, uninterrupted, tmp_path):
    whole, _ = uninterrupted
    resumed_at = []
    for n in range(1, N_BLOCKS + 2):  # the profile, then each block
        out = tmp_path / f"after-{n}"
        assert killed_after(job, out, n_checkpoints=n)
        resumed_at.append(sorted(p.name for p in work_dir(out).iterdir()))
        done = run(job, out)
        assert done.returncode == 0 and "resuming from" in done.stderr, done.stderr[-2000:]
        assert_same_output(out, whole)
    assert all("mixq.profile" in names for names in resumed_at)
    assert sum("blocks.safetensors" in names for names in resumed_at) >= N_BLOCKS - 1


def test_killed_at_random_moments_then_resumed(job, uninterrupted, tmp_path):
    whole, seconds = uninterrupted
    rng = random.Random(0)
    for i in range(4):
        out = tmp_path / f"random-{i}"
        killed_after(job, out, seconds=rng.uniform(0.3, 1.0) * seconds)
        done = run(job, out)
        assert done.returncode == 0, done.stderr[-2000:]
        assert_same_output(out, whole)


def test_a_rerun_with_other_inputs_is_refused(job, tmp_path):
    out = tmp_path / "other"
    assert killed_after(job, out, n_checkpoints=2)
    other = [*job[:3], "4.5bpw", *job[4:]]  # another budget
    refused = run(other, out)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1].startswith("mixq: error: ") and "differ in: settings" in refused.stderr
    assert run([*other, "--restart"], out).returncode == 0 and not work_dir(out).exists()


def test_a_full_disk_is_one_error_and_the_checkpoint_survives(job, uninterrupted, tmp_path):
    whole, _ = uninterrupted
    out = tmp_path / "full"

    def small_files():  # every file this process writes stops at 64 KiB, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    failed = run(job, out, preexec_fn=small_files)
    assert failed.returncode == 2, failed.stderr[-2000:]
    errors = [line for line in failed.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("mixq: error: ") and "File too large" in errors[0], failed.stderr
    assert not out.exists() and (work_dir(out) / "mixq.profile").is_file()
    done = run(job, out)
    assert done.returncode == 0 and "resuming from" in done.stderr, done.stderr[-2000:]
    assert_same_output(out, whole)
