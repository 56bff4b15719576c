"""defect-loop: an active-learning labeling loop for industrial surface-defect detection.

Importing this package has no side effects: nothing reads the environment, loads a model or
opens a connection until a function is called.
"""

__version__ = "0.1.0"
