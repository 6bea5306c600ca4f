"""Demonstration data: HDF5 episodes, collection from the simulator."""
from .hdf5 import Demo, DemoFormatError, iter_demos, read_demos, write_demos

__all__ = ["Demo", "DemoFormatError", "iter_demos", "read_demos", "write_demos"]
