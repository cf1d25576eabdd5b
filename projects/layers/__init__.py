"""Python face of the compiled ops in csrc/: autograd wrappers, pure-PyTorch references
and the dispatch between them."""
from .extension import axpy, extension_available, load_extension

__all__ = ["axpy", "extension_available", "load_extension"]
