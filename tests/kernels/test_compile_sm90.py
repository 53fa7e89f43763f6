"""The kernel compiles for an H100 (sm_90) down to a cubin, without a GPU.

The interpreter runs the kernel's Python, not Triton's compiler: type, scoping and layout errors
that only the compiler sees would reach a GPU machine untested. Triton compiles ahead of time
for a named target with its bundled ptxas, so this runs on any machine (in a subprocess: the test
process has TRITON_INTERPRET=1, which turns the kernel into an interpreted function).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from featurecache.kernels import cosine_alignment as ca

    # (student, target, mask, D, write_grad, channel scale): one-tile and D-tiled, masked or
    # not, int8c or not, fp64 checks.
    for sd, td, md, d, grad, cs in [
        ("bf16", "i8", "i1", 4096, True, True),
        ("fp16", "i8", None, 16385, True, True),
        ("fp16", "bf16", None, 16385, True, False),
        ("fp32", "fp16", "fp32", 3, False, False),
        ("fp64", "fp64", "i1", 7, True, True),
    ]:
        cfg = ca.launch_config(d)
        acc = "fp64" if sd == "fp64" else "fp32"
        pointers = {"S": sd, "T": td, "CS": acc, "M": md or acc, "C": acc, "LOSS": acc, "DS": sd}
        sig = {k: "*" + v for k, v in pointers.items()}
        sig |= {"c_no_mask": "fp32", "n_rows": "i32", "n_cols": "i32", "stride_s": "i32",
                "stride_t": "i32", "eps": "fp32", "ds_max": "fp32"}
        constexprs = {
            "HAS_CSCALE": cs, "HAS_MASK": md is not None, "WRITE_GRAD": grad,
            "SATURATE": sd in ("fp16", "bf16"),
            "ACC": tl.float64 if acc == "fp64" else tl.float32,
            "BLOCK_M": cfg["BLOCK_M"], "BLOCK_D": cfg["BLOCK_D"], "ONE_TILE": bool(cfg["ONE_TILE"]),
        }
        sig |= {k: "constexpr" for k in constexprs}
        src = ASTSource(ca._cosine_alignment_fwd_kernel, sig, constexprs)
        kernel = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"]}
        )
        assert kernel.asm["cubin"], (sd, td, md, d)
    for ds, acc in [("bf16", tl.float32), ("fp16", tl.float32), ("fp64", tl.float64)]:
        g = "fp64" if acc == tl.float64 else "fp32"
        sig = {"DS": "*" + ds, "G": "*" + g, "n_elements": "i32", "ACC": "constexpr",
               "BLOCK": "constexpr"}
        src = ASTSource(ca._scale_grad_kernel, sig, {"ACC": acc, "BLOCK": ca._SCALE_BLOCK})
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"], ds
    print("compiled")
    """
)


def test_kernel_compiles_for_sm90() -> None:
    pytest.importorskip("triton.backends.nvidia", reason="triton without its CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence triton 3.9's default-change warning
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
