"""benchmarks/gpu.sh and the CUDA paths it measures.

Without a GPU (CI): the script's CPU smoke run end to end (every section recorded with a
positive rate), its refusals, and its loud failure when a part fails. The ``gpu`` tests
(skipped without CUDA, see conftest.py) run on a CUDA machine: the bf16 + channels_last
and compiled train steps, a 1-process torchrun DDP run over nccl, nvJPEG decode against
the CPU decoder, and the script itself at tiny sizes on CUDA.
"""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, stage_env

GPU_SH = ROOT / "benchmarks" / "gpu.sh"
RECORDED = ROOT / "benchmarks" / "RESULTS-gpu.md"
SECTION_NUMBERS = ["1", "2", "3", "4"]   # train step, loader decode, evaluation, DDP


def run_bounded(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ROOT in its own process group (stdout and stderr together); the whole group
    (torchrun's workers, loader workers) is killed when it runs past ``timeout`` s or the test stops."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {timeout} s; last output:\n{out[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def sections(report: str) -> dict[str, str]:
    """``## N. title`` sections of a gpu.sh report -> {N: body}."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^## (\d+)\. [^\n]*\n(.*?)(?=^## |\Z)", report, re.M | re.S)}


def rates(text: str) -> list[float]:
    """Every rate in ``text``: cells of table columns headed ``.../s`` (img/s, images/s), and inline
    ``<number> <unit>/s`` (e.g. ``75.9 GFLOP/s``)."""
    found = [float(v.replace(",", "")) for v in re.findall(r"(\d[\d,]*(?:\.\d+)?) ?[A-Za-z]+/s\b", text)]
    header = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [i for i, c in enumerate(cells) if c.endswith("/s")]
        elif not set("".join(cells)) <= set("-: "):   # not the |---| line
            for i in header:
                number = re.match(r"\d[\d,]*(?:\.\d+)?", cells[i]) if i < len(cells) else None
                if number:
                    found.append(float(number.group().replace(",", "")))
    return found


def check_report(report: str, device_words: str) -> dict[str, str]:
    """Assert what every gpu.sh report holds: four sections, each with the machine line, each part's
    load and wall time, and a positive rate; no failed part. Returns the sections."""
    parts = sections(report)
    assert sorted(parts) == SECTION_NUMBERS, f"sections found: {sorted(parts)}\n{report[:3000]}"
    assert "FAILED" not in report
    for number, body in parts.items():
        assert device_words in body and "cores" in body, f"section {number} names no machine:\n{body[:800]}"
        assert "load average" in body and re.search(r"Took \d+\.\d s", body), f"section {number}: no load/time"
        positive = [r for r in rates(body) if r > 0 and math.isfinite(r)]
        assert positive, f"section {number} has no positive rate:\n{body[:2000]}"
    return parts


def recorded_state() -> tuple[bool, float]:
    return RECORDED.exists(), RECORDED.stat().st_mtime if RECORDED.exists() else 0.0


# --------------------------------------------------------------------------- CI: no GPU needed

@pytest.mark.slow
def test_cpu_smoke_run_records_every_section_with_a_rate(tmp_path):
    out = tmp_path / "RESULTS.md"
    before = recorded_state()
    done = run_bounded(["bash", str(GPU_SH), "--cpu-smoke", "--out", str(out)], timeout=300,
                       env=stage_env(TMPDIR=str(tmp_path)))
    assert done.returncode == 0, done.stdout[-6000:]
    assert re.search(r"gpu\.sh: total \d+\.\d s", done.stdout)
    parts = check_report(out.read_text(), "CPU:")
    train = parts["1"]
    for mode in ("fp32", "channels_last+bf16", "compile"):
        assert re.search(rf"^\| default \| {re.escape(mode)}( \(ran fp32\))? \| 32 \| 64 \|", train, re.M), mode
    assert "Keeping up with" in train
    assert "| DistributedDataParallel | gloo | DistributedDataParallel |" in parts["4"]
    assert recorded_state() == before, "the smoke run touched benchmarks/RESULTS-gpu.md"


def test_tiny_runs_refuse_to_overwrite_the_recorded_gpu_results():
    before = recorded_state()
    done = run_bounded(["bash", str(GPU_SH), "--cpu-smoke", "--out", str(RECORDED)], timeout=120)
    assert done.returncode == 2 and "never overwrite the recorded GPU results" in done.stdout, done.stdout
    assert recorded_state() == before


def test_unknown_argument_is_a_clear_error():
    done = run_bounded(["bash", str(GPU_SH), "--fast"], timeout=30)
    assert done.returncode == 2 and "unknown argument '--fast'" in done.stdout, done.stdout


def test_a_failing_part_fails_the_run_loudly_and_keeps_the_results_file(tmp_path):
    # A Python that works for the script's probe but fails every benchmark it is asked to run.
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\n[[ $1 == - ]] && exec {sys.executable} "$@"\n'
                      'echo "simulated failure of: $*" >&2\nexit 3\n')
    python.chmod(0o755)
    out = tmp_path / "RESULTS.md"
    out.write_text("earlier results\n")
    done = run_bounded(["bash", str(GPU_SH), "--cpu-smoke", "--out", str(out)], timeout=120,
                       env=stage_env(PYTHON=str(python), TMPDIR=str(tmp_path)))
    assert done.returncode == 1, done.stdout[-3000:]
    assert "FAILED parts: train-step decode-cpu evaluation ddp" in done.stdout
    assert out.read_text() == "earlier results\n"
    failed = (tmp_path / "RESULTS.failed.md").read_text()
    assert failed.count("**FAILED**, exit 3") == 4 and "simulated failure of: benchmarks/train_step.py" in failed


# --------------------------------------------------------------------------- on a CUDA machine

def cuda_device():
    import torch
    return torch.device("cuda", torch.cuda.current_device())


@pytest.mark.gpu
def test_cuda_train_step_in_bf16_and_channels_last_reduces_the_loss():
    from benchmarks.train_step import step_rate
    row = step_rate("default", "channels_last+bf16", 5, cuda_device(), warmup=2)
    assert row["bf16"], "bf16 autocast did not run (the backend fell back to fp32)"
    assert all(math.isfinite(v) for v in row["losses"]), row["losses"]
    assert row["loss_last"] < 0.9 * row["losses"][0], row["losses"]   # memorising one fixed batch
    assert row["img_s"] > 0 and row["peak_gib"] > 0


@pytest.mark.gpu
def test_cuda_compiled_step_matches_eager_and_reports_its_compile_time():
    from benchmarks.train_step import step_rate
    eager = step_rate("default", "channels_last+bf16", 3, cuda_device(), warmup=2)
    compiled = step_rate("default", "compile", 3, cuda_device(), warmup=2)
    # Same seed, same batch: the first forward (before any update) sees the same weights.
    assert compiled["losses"][0] == pytest.approx(eager["losses"][0], rel=0.02)
    assert compiled["loss_last"] < 0.9 * compiled["losses"][0], compiled["losses"]
    assert compiled["first_s"] > 3 * compiled["s_per_step"], "the first step should hold the compilation"


@pytest.mark.gpu
@pytest.mark.distributed
def test_one_process_torchrun_ddp_over_nccl_completes(tmp_path):
    out = tmp_path / "ddp.md"
    done = run_bounded([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        "benchmarks/ddp_step.py", "--device", "cuda", "--preset", "default", "--size", "64",
                        "--steps", "3", "--warmup", "2", "--out", str(out)], timeout=300, env=stage_env())
    assert done.returncode == 0, done.stdout[-6000:]
    report = out.read_text()
    assert "| no process group | none | PVEN |" in report
    assert "| DistributedDataParallel | nccl | DistributedDataParallel |" in report
    assert len([r for r in rates(report) if r > 0]) == 2


@pytest.mark.gpu
def test_nvjpeg_decode_matches_the_cpu_decoder():
    import torch
    from torchvision.io import decode_jpeg, encode_jpeg
    images = []
    for h, w in ((64, 80), (128, 128), (256, 200)):
        y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        # Smooth content (a soft blob on gradients): decoders may differ at hard chroma edges, where
        # their upsampling filters differ, not in what is tested here.
        blob = torch.exp(-((y - 0.5) ** 2 + (x - 0.4) ** 2) / 0.02)
        images.append((torch.stack([x, y, 0.5 * blob + 0.25 * (x + y)]) * 255).round().to(torch.uint8))
    data = [encode_jpeg(im, quality=90) for im in images]
    cpu = [decode_jpeg(d) for d in data]
    gpu = [*decode_jpeg(data, device="cuda"), decode_jpeg(data[0], device="cuda")]   # batched, then one alone
    for original, c, g in zip([*images, images[0]], [*cpu, cpu[0]], gpu, strict=True):
        assert g.device.type == "cuda" and g.shape == c.shape == original.shape and g.dtype == torch.uint8
        diff = (g.cpu().int() - c.int()).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 16, (diff.float().mean(), diff.max())
        assert (c.int() - original.int()).abs().float().mean() < 4   # both decoded the real picture


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_sh_at_tiny_sizes_on_cuda_records_every_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    done = run_bounded(["bash", str(GPU_SH), "--tiny", "--out", str(out)], timeout=480,
                       env=stage_env(TMPDIR=str(tmp_path)))
    assert done.returncode == 0, done.stdout[-6000:]
    parts = check_report(out.read_text(), "GPU: NVIDIA")
    assert "### decode-cuda" in parts["2"] and "### decode-cpu" in parts["2"]
    assert "--compile-backend inductor" in parts["1"]
    assert "| DistributedDataParallel | nccl | DistributedDataParallel |" in parts["4"]
