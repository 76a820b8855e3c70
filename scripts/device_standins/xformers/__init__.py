"""A stand-in for xformers on the GPU machines (see ../README.md)."""
