"""The merge engine (torch): kernels per method, streaming safetensors I/O, plan execution."""
