"""Importers from PyTorch into LLMasOS IR (installed as ``llmasos.frontends``).

- ``torch_export``: torch.export (ExportedProgram) -> IR, the default frontend.
- ``torch_mlir``: torch-mlir's torch dialect -> IR, the second opinion used in differential tests.
"""
