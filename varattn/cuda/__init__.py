"""The CUDA plumbing: compiling and launching kernels (loader.py, the only
module that touches CuPy), the host mirrors of the kernels' structs
(structs.py) and tensor maps for Hopper's copy engine (tensor_map.py)."""
