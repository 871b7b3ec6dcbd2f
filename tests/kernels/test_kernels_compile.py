"""Every Triton kernel compiles for real GPUs (sm_90 Hopper, sm_80 Ampere) to a cubin.

This needs no GPU: Triton's code generator, the LLVM backend and the bundled ptxas
run on the CPU. It catches what the CPU interpreter cannot (e.g. a plain Python
global read inside @triton.jit is a compile error on the GPU but works under
TRITON_INTERPRET=1), for every flag combination and pointer dtype, with 32- and
64-bit strides.
"""
import os
import warnings

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import minorsft  # noqa: E402,F401  (registers minorsft.kernels from a source tree)

pytestmark = [
    pytest.mark.no_interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="kernels are interpreted functions under TRITON_INTERPRET=1"),
]

TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32)}
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _compile(kernel, target, *, ptrs, consts, floats=(), int_type="i32", num_warps=8):
    """Compile ``kernel`` (a JITFunction or its Heuristics wrapper) for ``target``.

    ``ptrs``: pointer args -> type string, or None (a None pointer is a constexpr);
    ``consts``: constexpr values; ``floats``: fp32 scalars; every other arg is an int.
    """
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):   # unwrap heuristics / autotune
        fn = fn.fn
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in consts]
    assert not missing, f"constexpr arguments not given: {missing}"
    sig, constexprs = {}, {}
    for name in fn.arg_names:
        if name in consts or (name in ptrs and ptrs[name] is None):
            sig[name] = "constexpr"
            constexprs[name] = consts.get(name)
        elif name in ptrs:
            sig[name] = ptrs[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = int_type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=target,
                                  options={"num_warps": num_warps})
    assert compiled.asm["cubin"], "no cubin produced"
    return compiled


# Every dtype x reference x split with the label flag (the library always passes one);
# without the flag and with soft-capping for bf16 only (the flags are independent code).
FWD_VARIANTS = ([(dt, ref, split, True, False) for dt in ("bf16", "fp16", "fp32")
                 for ref in (False, True) for split in (False, True)]
                + [("bf16", ref, split, False, cap) for ref in (False, True) for split in (False, True)
                   for cap in (False, True)])


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("dtype,has_ref,split,flag,softcap", FWD_VARIANTS)
def test_logprobs_forward_compiles(target, dtype, has_ref, split, flag, softcap):
    from minorsft.kernels import logprobs as K
    f32 = "*fp32"
    ptrs = {
        "logits_ptr": PTR[dtype], "ref_ptr": PTR[dtype] if has_ref else None, "labels_ptr": "*i64",
        "lp_ptr": None if split else f32, "lse_ptr": None if split else f32,
        "ref_lp_ptr": f32 if has_ref and not split else None,
        "part_ptr": f32 if split else None, "tgt_ptr": f32 if split else None,
        "ref_part_ptr": f32 if split and has_ref else None,
        "ref_tgt_ptr": f32 if split and has_ref else None,
        "flag_ptr": "*i64" if flag else None,
    }
    consts = {"HAS_REF": has_ref, "SPLIT": split, "HAS_FLAG": flag, "SOFTCAP": softcap,
              "BLOCK_V": K.DEFAULT_BLOCK_V}
    for int_type in ("i32", "i64"):
        _compile(K._logprobs_fwd_kernel, TARGETS[target], ptrs=ptrs, consts=consts,
                 floats=("scale2", "pre_cap", "softcap"), int_type=int_type,
                 num_warps=K.DEFAULT_NUM_WARPS)


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("softcap", [False, True])
def test_logprobs_backward_compiles(target, dtype, softcap):
    """The GPU build rounds with the hardware conversion (HAND_ROUND=False); the hand
    rounding of the interpreter must compile too."""
    from minorsft.kernels import logprobs as K
    ptrs = {"logits_ptr": PTR[dtype], "labels_ptr": "*i32", "lse_ptr": "*fp32",
            "glp_ptr": "*fp32", "grad_ptr": PTR[dtype]}
    for int_type, hand in (("i32", False), ("i64", False), ("i64", True)):
        compiled = _compile(K._logprobs_bwd_kernel, TARGETS[target], ptrs=ptrs,
                            consts={"BLOCK_V": K.DEFAULT_BLOCK_V, "HAND_ROUND": hand,
                                    "SOFTCAP": softcap},
                            floats=("scale2", "dscale", "pre_cap", "softcap"), int_type=int_type,
                            num_warps=K.DEFAULT_NUM_WARPS)
        if dtype == "bf16" and not hand:   # the native conversion: cvt.rn(.satfinite).bf16.f32
            assert "cvt.rn" in compiled.asm["ptx"] and "bf16.f32" in compiled.asm["ptx"]
