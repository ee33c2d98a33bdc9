from .inspect import inspect
