"""Exporting models into the form edge agents run: forward-only ONNX with weights as inputs.

``export_model`` turns a torch classifier into a model directory, ``lift_onnx`` does the
same for a third-party ONNX classifier, and ``verify_model_dir`` checks the result
against a reference on random batches and perturbed weights.
"""

from .errors import ExportError, VerifyError
from .hook import Lifted, lift_onnx
from .names import onnx_names
from .torch_export import cpu_float32, export_model, select_parameters
from .verify import VerifyReport, onnx_reference, torch_reference, verify_model_dir

__all__ = ["ExportError", "Lifted", "VerifyError", "VerifyReport", "cpu_float32",
           "export_model", "lift_onnx", "onnx_names", "onnx_reference", "select_parameters",
           "torch_reference", "verify_model_dir"]
