"""Importers from PyTorch into LLMasOS IR (installed as ``llmasos.frontends``).

- ``torch_export``: torch.export (ExportedProgram) -> IR, the default frontend.
- ``torch_mlir``: torch-mlir's torch dialect -> IR, the second opinion used in differential tests.
"""

from .torch_export import Imported, export, import_exported_program, import_module  # noqa: E402
from .aten import register_converter, unregister_converter  # noqa: E402
from .errors import FrontendError, UnsupportedOpError  # noqa: E402

__all__ = ["Imported", "export", "import_exported_program", "import_module", "register_converter",
           "unregister_converter", "FrontendError", "UnsupportedOpError"]
