"""The bundle contract: manifest schema, engine I/O signatures, read and verify.

Pure Python (standard library only); both the torch-side exporter and the torch-free
runtime import it.
"""
