"""Enclave: the control plane that runs untrusted code for many organisations.

`enclave.app.create_app` builds the WSGI application; `enclave.cli` holds the
operator commands (migrations, development tokens).
"""
