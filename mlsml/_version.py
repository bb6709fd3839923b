"""The version of mlsml, in a module of its own.

Submodules that print the version (the MIXREGLS report) import it from here: importing it
from the package itself could run into a partly initialised ``mlsml`` during ``import mlsml``.
``setup.cfg`` reads it from here too (statically, without importing mlsml's dependencies).
"""

__version__ = "0.1.0"
