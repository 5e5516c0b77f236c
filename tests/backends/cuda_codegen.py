"""The skip marker of the CUDA build-only tests (no GPU needed: they compile for cuda:sm_90a and read the source)."""
import pytest
import tvm

needs_cuda_codegen = pytest.mark.skipif(tvm.get_global_func("target.build.cuda", allow_missing=True) is None,
                                        reason="this TVM build has no CUDA code generator")
