"""Triton kernels of the kdengine ops (second GPU path; CPU under TRITON_INTERPRET=1)."""
