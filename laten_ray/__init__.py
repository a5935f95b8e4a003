"""laten-ray: LaTen (Locate-then-Align) parametric knowledge transfer between LLMs."""
__version__ = "0.1.0"
