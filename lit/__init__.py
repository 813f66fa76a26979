"""Lightning side of the project: data, training and evaluation around :mod:`fwpkm`."""
