"""Compiled kernels: ``cpu`` builds ``cpu_kernels.cpp`` for this CPU on first use and calls it through ctypes."""
