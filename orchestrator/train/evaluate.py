"""Test-set accuracy of the global model during the ZO phase, through ONNX Runtime.

The evaluator binds the round server's own weight arrays to the exported graph (weights
as inputs), so what it measures is exactly the state the journal and the agents hold,
without a copy and without a round trip through torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from protocols.manifest import Manifest


class Evaluator:
    def __init__(self, model_dir: Path, manifest: Manifest, weights: Sequence[np.ndarray],
                 x: np.ndarray, y: np.ndarray, batch_size: int = 512,
                 threads: int | None = None) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(Path(model_dir) / manifest.graph), options,
                                            providers=["CPUExecutionProvider"])
        self.manifest = manifest
        self.binding = self.session.io_binding()
        self._values = [ort.OrtValue.ortvalue_from_numpy(w) for w in weights]  # shared buffers
        for p, value in zip(manifest.parameters, self._values):
            self.binding.bind_ortvalue_input(p.name, value)
        for name in manifest.outputs:
            self.binding.bind_output(name)
        self.x, self.y = np.ascontiguousarray(x, np.float32), np.asarray(y, np.int64)
        self.batch_size = batch_size

    def __call__(self) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) over the whole test set."""
        return self.measure(self.x, self.y)

    def measure(self, x_all: np.ndarray, y_all: np.ndarray) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of the current weights over any labelled set."""
        x_all = np.ascontiguousarray(x_all, np.float32)
        y_all = np.asarray(y_all, np.int64)
        total, correct = 0.0, 0
        for start in range(0, len(y_all), self.batch_size):
            x = x_all[start:start + self.batch_size]
            y = y_all[start:start + self.batch_size]
            self.binding.bind_cpu_input(self.manifest.input_name, x)
            self.binding.bind_cpu_input(self.manifest.label_name, y)
            self.session.run_with_iobinding(self.binding)
            loss, right = self.binding.copy_outputs_to_cpu()
            total += float(loss) * len(y)
            correct += int(right)
        return total / len(y_all), correct / len(y_all)
