"""OpenAI-compatible gateway: node directory, router, usage capture.

The package exports nothing: import the module you need (gateway.main.create_app, gateway.settings,
gateway.keys, ...). Importing a light module such as gateway.router must not load the web app, the
database or the chain client (tests/test_layering.py checks it)."""
