"""Triton kernels, one file per op. Importing this package needs triton; the ops import it lazily."""
