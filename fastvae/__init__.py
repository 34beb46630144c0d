"""fastvae: the lab's convolutional VAE, trained fast, exported to ONNX, run anywhere.

Kept free of torch imports so that `fastvae.runtime` can be used with numpy + onnxruntime alone.
"""

__version__ = "0.1.0"
