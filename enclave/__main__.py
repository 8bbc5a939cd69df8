"""`python -m enclave <command>`: see `enclave.cli`."""

from enclave.cli import main

main()
