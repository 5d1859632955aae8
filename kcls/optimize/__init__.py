"""Edge-ready models: TFLite post-training quantization, TF-MOT pruning and QAT.

`kcls.optimize.tflite.optimize` converts a trained classifier (a run directory or an
export) to TFLite float32 and to an optimized variant, evaluates both on the recipe's
held-out test split with the TFLite interpreter and writes `optimize.json` /
`optimize.md`. Its parts: `convert` (TFLite conversion and post-training quantization),
`interpreter` (running and timing TFLite models), `mot` (TF-MOT pruning and QAT in a
child process, `mot_worker`).

Only `kcls.optimize.mot_worker`, run as a child process, imports
`tensorflow_model_optimization`: importing it switches the whole process to legacy
tf-keras (TF_USE_LEGACY_KERAS=1), which breaks Keras 3 / KerasCV.
"""

from kcls.optimize.convert import PTQ_METHODS, OptimizeError
from kcls.optimize.tflite import METHODS, optimize

__all__ = ["METHODS", "PTQ_METHODS", "OptimizeError", "optimize"]
