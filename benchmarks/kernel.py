"""Benchmark: the fused cosine alignment loss, forward + backward, against torch.

Claim (issue 3): on an H100 the fused Triton pass reaches >= 85 % of the device's copy bandwidth
at N >= 16k tokens, D = 4096; it is >= 3x the eager torch reference and >= 1.3x torch.compile of
the reference; its peak extra memory is no more than the gradient buffer.

On CUDA, per shape (tokens N in {2k, 16k, 131k} x D in {1024, 2048, 4096}, bf16/fp16 student,
bf16/int8/int8c target; int8c = int8 values with a (D,) float32 channel scale applied in the
pass) and provider (triton; triton with the loss scaled outside the call, so that
the backward must scale dS; torch-eager; torch-compile), it reports the fwd+bwd time
(triton.testing.do_bench: median and p20..p80), the effective bandwidth over the bytes the fused
pass must move (read S + read T + write dS), that as % of the device copy bandwidth measured in
the same run (a large tensor copy: read + write), the speedups against both torch providers, and
the peak memory allocated beyond the inputs. Without a GPU it times the CPU implementations (the
autograd reference eager and under torch.compile, and the op's CPU path in row blocks; claim of
issue 21: the op's CPU path at least matches torch.compile of the naive form; the op's CPU path
is the closed form compiled by Inductor, and the eager row blocks where nothing compiles) on
modest shapes,
and says that the Triton path needs a GPU.

    python -m featurecache.benchmarks.kernel [--json FILE] [--quick]
    featurecache bench kernel [--json FILE] [--quick]
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from featurecache.benchmarks import harness
from featurecache.kernels import cosine_alignment as _ca
from featurecache.kernels import cosine_alignment_cpu as _cpu
from featurecache.kernels import cosine_alignment_loss, cosine_alignment_loss_reference

TITLE = "Cosine alignment loss, forward + backward"
GPU_TOKENS = (2048, 16384, 131072)
GPU_DIMS = (1024, 2048, 4096)
STUDENT_DTYPES = (torch.bfloat16, torch.float16)
TARGET_KINDS = ("bf16", "int8", "int8c")  # int8c: int8 values + a (D,) fp32 channel scale
COPY_BYTES = 1 << 30  # 1 GiB copied for the device copy bandwidth (large enough to leave L2)
MIB = 1 << 20

_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "int8"}


def _inputs(
    n: int, d: int, sdtype: torch.dtype, kind: str, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(student (n, d) requiring grad, target (n, d), channel scale (d,) fp32 or None)."""
    gen = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(n, d, device=device, dtype=sdtype, generator=gen).requires_grad_()
    if kind in ("int8", "int8c"):
        target = torch.randint(-127, 128, (n, d), device=device, dtype=torch.int8, generator=gen)
    else:
        target = torch.randn(n, d, device=device, dtype=torch.bfloat16, generator=gen)
    cscale = None
    if kind == "int8c":
        cscale = 1.0 + 10.0 * torch.rand(d, device=device, generator=gen)
    return student, target, cscale


def _fwd_bwd(
    loss_fn: Callable[..., torch.Tensor],
    student: torch.Tensor,
    target: torch.Tensor,
    cscale: torch.Tensor | None,
) -> Callable[[], None]:
    kwargs = {} if cscale is None else {"channel_scale": cscale}

    def step() -> None:
        student.grad = None
        loss_fn(student, target, **kwargs).backward()

    return step


def _fused_bytes(n: int, d: int, sdtype: torch.dtype, kind: str) -> int:
    """Bytes the fused pass must move: read S, read T, write dS (int8c's (D,) vector, read once
    per program, is not counted)."""
    s_size = torch.finfo(sdtype).bits // 8
    t_size = 1 if kind in ("int8", "int8c") else 2
    return n * d * (2 * s_size + t_size)


def _copy_bandwidth_gbs(device: str) -> list[float]:
    """GB/s samples of a 1 GiB device-to-device tensor copy (bytes read + bytes written)."""
    import triton.testing

    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="all")
    return [2 * COPY_BYTES / (t * 1e-3) / 1e9 for t in times_ms]


def _peak_extra_mib(step: Callable[[], None], student: torch.Tensor, device: str) -> float:
    """Peak memory allocated during one fwd+bwd beyond the inputs (the student's gradient from
    the previous step is dropped first, so it counts as part of the step)."""
    student.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MIB


def _run_cuda(quick: bool, device: str = "cuda") -> tuple[list[harness.Result], str]:
    import triton.testing

    name = harness.device_name(device)
    # torch.compile specializes on each shape (its best case); allow one graph per shape.
    torch._dynamo.config.cache_size_limit = 256
    compiled_reference = torch.compile(cosine_alignment_loss_reference, dynamic=False)
    providers: dict[str, Callable[..., torch.Tensor]] = {
        "triton": cosine_alignment_loss,
        # lambda outside the call: grad_output 0.2 costs the backward an in-place scaling pass
        "triton (0.2 * loss)": lambda s, t, **kw: 0.2 * cosine_alignment_loss(s, t, **kw),
        "torch-eager": cosine_alignment_loss_reference,
        "torch-compile": compiled_reference,
    }
    copy = _copy_bandwidth_gbs(device)
    copy_gbs = harness.summarize(copy)[0]
    rows = [harness.result("device copy bandwidth (1 GiB copy_)", "torch", copy, "GB/s", name)]
    tokens, dims = ((2048,), (1024,)) if quick else (GPU_TOKENS, GPU_DIMS)
    sdtypes, kinds = (STUDENT_DTYPES, TARGET_KINDS)
    if quick:
        sdtypes, kinds = (torch.bfloat16,), ("int8c",)
    for n in tokens:
        for d in dims:
            for sdtype in sdtypes:
                for kind in kinds:
                    student, target, cscale = _inputs(n, d, sdtype, kind, device)
                    what = f"fwd+bwd N={n} D={d} {_SHORT[sdtype]}/{kind}"
                    fused = _fused_bytes(n, d, sdtype, kind)
                    grad_mib = n * d * student.element_size() / MIB
                    shape_rows = []
                    for provider, fn in providers.items():
                        step = _fwd_bwd(fn, student, target, cscale)
                        step()  # compile / autotune outside the timing
                        ms = triton.testing.do_bench(step, return_mode="all")
                        peak = _peak_extra_mib(step, student, device)
                        med = harness.summarize(ms)[0]
                        gbs = fused / (med * 1e-3) / 1e9
                        shape_rows.append(
                            harness.result(
                                what,
                                provider,
                                ms,
                                "ms",
                                name,
                                GBps=gbs,
                                pct_copy_bw=100.0 * gbs / copy_gbs,
                                peak_extra_MiB=peak,
                                grad_MiB=grad_mib,
                            )
                        )
                    by = {r.provider: r.median for r in shape_rows}
                    fused_row = shape_rows[0]
                    fused_row.extra["x_vs_eager"] = by["torch-eager"] / by["triton"]
                    fused_row.extra["x_vs_compile"] = by["torch-compile"] / by["triton"]
                    rows += shape_rows
                    del student, target
                    torch.cuda.empty_cache()
    note = (
        f"Device: {name}. Copy bandwidth measured in the same run: {copy_gbs:.0f} GB/s. "
        "GBps counts the bytes the fused pass must move (read S + read T + write dS) for every "
        "provider; peak_extra_MiB is the peak allocation of one fwd+bwd beyond the inputs, "
        "grad_MiB the size of the student gradient."
    )
    return rows, note


def _row_blocks_op(student: torch.Tensor, target: torch.Tensor, **kw: Any) -> torch.Tensor:
    """The op with its CPU path held to the eager row blocks (as where nothing compiles)."""
    saved, _cpu._COMPILED = _cpu._COMPILED, False
    try:
        return cosine_alignment_loss(student, target, **kw)
    finally:
        _cpu._COMPILED = saved


def _run_cpu(quick: bool) -> tuple[list[harness.Result], str]:
    """The CPU implementations side by side: the autograd reference (eager), torch.compile of it
    (the naive form at its best: one graph per shape), and the op's CPU path (row blocks,
    kernels/cosine_alignment_cpu.py); fp32 and bf16 students."""
    name = harness.device_name("cpu")
    torch._dynamo.config.cache_size_limit = 256  # one graph per shape and dtype (its best case)
    print(
        "No CUDA device: the Triton path needs a GPU, so it is not timed here. "
        "Timing the CPU implementations instead (the autograd reference eager and compiled, "
        "and the op's CPU path)."
    )
    providers: dict[str, Callable[..., torch.Tensor]] = {
        "torch-eager (reference autograd)": cosine_alignment_loss_reference,
        "torch-compile (reference autograd)": torch.compile(
            cosine_alignment_loss_reference, dynamic=False
        ),
    }
    if not _ca._INTERPRET:  # under TRITON_INTERPRET=1 the op would time the interpreter
        providers["op cpu path (compiled closed form)"] = cosine_alignment_loss
        providers["op cpu path (eager row blocks)"] = _row_blocks_op
    shapes = [(256, 256)] if quick else [(2048, 1024), (2048, 4096), (16384, 1024)]
    cases = [(torch.float32, "fp32"), (torch.bfloat16, "int8c")]
    if not quick:
        cases += [(torch.bfloat16, kind) for kind in TARGET_KINDS if kind != "int8c"]
    repeats = 3 if quick else 5
    rows = []
    for n, d in shapes:
        for sdtype, kind in cases:
            student, target, cscale = _inputs(n, d, sdtype, kind, "cpu")
            if kind == "fp32":
                target = target.float()
            what = f"fwd+bwd N={n} D={d} {_SHORT[sdtype]}/{kind}"
            fused = _fused_bytes(n, d, sdtype, kind)
            by: dict[str, float] = {}
            for provider, fn in providers.items():
                step = _fwd_bwd(fn, student, target, cscale)
                step()  # compile outside the timing
                samples = harness.measure(step, warmup=1, repeats=repeats)
                ms = [x * 1e3 for x in samples]
                by[provider] = harness.summarize(samples)[0]
                gbs = fused / by[provider] / 1e9
                rows.append(harness.result(what, provider, ms, "ms", name, GBps=gbs))
            for k, provider in enumerate(by):
                if provider.startswith("op cpu path"):
                    row = rows[len(rows) - len(by) + k]
                    row.extra["x_vs_compile"] = (
                        by["torch-compile (reference autograd)"] / by[provider]
                    )
                    row.extra["x_vs_eager"] = by["torch-eager (reference autograd)"] / by[provider]
    note = (
        f"CPU figures ({name}, {harness.load_note()}): x_vs_compile is torch.compile of the "
        "naive form's time over the op's CPU path's, measured side by side. The Triton path "
        "needs a GPU and is not timed here: run `featurecache bench kernel` on a CUDA machine "
        "for the GPU figures."
    )
    return rows, note


def run(json_path: str | Path | None = None, quick: bool = False) -> list[harness.Result]:
    """Time the loss on CUDA (Triton vs torch) or, without a GPU, the CPU implementations.
    Prints the table, writes JSON when `json_path` is given, and (unless `quick`) records the
    table in benchmarks/RESULTS.md under "kernel"."""
    if torch.cuda.is_available():
        rows, note = _run_cuda(quick)
    else:
        rows, note = _run_cpu(quick)
    harness.publish(rows, TITLE, json_path, None if quick else "kernel", note)
    return rows


if __name__ == "__main__":
    harness.main(run, __doc__)
