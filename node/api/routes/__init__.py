"""The node API's routes, one module per resource (the contract is node/api/__init__.py's docstring)."""
