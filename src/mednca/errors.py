"""Errors the engine raises for bad input. Each message names the file or value at fault, so a command line
or a viewer can show it to the user as it is, without a traceback."""


class MedNCAError(Exception):
    """Base class: anything the user can fix by giving other input."""


class VolumeError(MedNCAError, ValueError):
    """A scan or label file that cannot be read, or whose contents cannot be segmented."""


class CheckpointError(MedNCAError, ValueError):
    """A model file that is not a Med-NCA model, is damaged, or was altered after it was saved."""
