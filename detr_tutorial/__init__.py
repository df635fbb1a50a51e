"""detr_tutorial: the companion library of the DETR tutorial book.

Each module holds one concept of the DETR family and is built step by step in
the chapter of the same name.
"""
__version__ = "0.1.0"
