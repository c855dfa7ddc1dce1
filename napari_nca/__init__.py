"""napari plugin for Med-NCA segmentation: reader, writer, sample data and dock widgets.

Everything here turns layers into calls of the ``mednca`` engine and results back into layers.
"""

__version__ = "0.1.0"
