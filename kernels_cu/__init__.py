"""CUDA C++ sources of hgrn_cupy, shipped as package data and read by name through importlib.resources."""
