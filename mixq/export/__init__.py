"""Writers of quantized models: mixq's own safetensors layout (native.py); GGUF and
compressed-tensors exporters join here, one file each."""
