"""Native CPU kernels the engine calls through ctypes, compiled on first use (`native.py`)."""
