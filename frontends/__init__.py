"""Importers from PyTorch into LLMasOS IR (installed as ``llmasos.frontends``).

- ``torch_export``: torch.export (ExportedProgram) -> IR, the default frontend.
- ``torch_mlir``: torch-mlir's torch dialect -> IR, the second opinion used in differential tests.
- ``kv_ops``: the KV-cache torch custom ops (the torch spelling of the IR's ``kv.append`` / ``kv.attention``).

The directory sits at the repository root and pyproject maps it into the llmasos namespace; its one import
name is ``llmasos.frontends``. Imported as top-level ``frontends`` (the repository root on sys.path) it
would be a second copy with a second converter registry and a second registration of the torch custom ops,
so that is refused here, before anything else runs.
"""
if __name__ != "llmasos.frontends":
    raise ImportError(f"the frontends package is llmasos.frontends; import it under that name, not as {__name__!r} "
                      "(a second copy would have its own converter registry)", name=__name__)

from .torch_export import Imported, export, import_exported_program, import_module  # noqa: E402
from .aten import register_converter, unregister_converter  # noqa: E402
from .errors import FrontendError, UnsupportedOpError  # noqa: E402

__all__ = ["Imported", "export", "import_exported_program", "import_module", "register_converter",
           "unregister_converter", "FrontendError", "UnsupportedOpError"]
